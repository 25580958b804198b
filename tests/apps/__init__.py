"""WSGI and contract applications served by the end-to-end tests through a real gunicorn.

Every application logs each call as one ``METHOD PATH_INFO`` line to the file named by the
environment variable ``TEST_APP_CALL_LOG`` (see :func:`tests.apps.common.log_call`), so a test can
prove that a refused request never reached it.
"""
