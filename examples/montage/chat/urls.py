from django.contrib.auth.views import LoginView, LogoutView
from django.urls import path

from . import views

app_name = "chat"

urlpatterns = [
    path("", views.lobby, name="lobby"),
    path(
        "login/",
        LoginView.as_view(template_name="chat/login.html", next_page="chat:lobby"),
        name="login",
    ),
    path("logout/", LogoutView.as_view(next_page="chat:login"), name="logout"),
    path("<slug:room>/", views.room, name="room"),
    path("<slug:room>/ws/", views.room_socket, name="socket"),
]
