from django.db import models


class Note(models.Model):
    """A short note, written through the async ModelForm view or the admin."""

    title = models.CharField(max_length=120)
    body = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return self.title
