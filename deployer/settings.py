"""Greenlight settings.

Everything that differs between machines comes from environment variables
(12-factor, read with django-environ); the defaults make `make demo` work on a
laptop with nothing configured. The README lists every variable.
"""

import secrets
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

# Runtime state that must never be committed: the SQLite database, the
# generated secret key, the sandbox's instances and endpoints file.
VAR_DIR = Path(env.str("GREENLIGHT_VAR_DIR", default=str(BASE_DIR / "var"))).resolve()


def _secret_key() -> str:
    if key := env.str("SECRET_KEY", default=""):
        return key
    # Generated once and kept under var/ so sessions survive restarts without
    # anyone having to invent a key for a demo.
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.touch(mode=0o600)
        path.write_text(key)
        return key


SECRET_KEY = _secret_key()
# The audit chain's HMAC key (releases/chain.py). Empty: derived from SECRET_KEY.
# Set it before ever rotating SECRET_KEY, or the chain written so far stops verifying.
AUDIT_KEY = env.str("AUDIT_KEY", default="")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "channels",
    "django_htmx",
    "deployer",
    "releases",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "deployer.urls"
ASGI_APPLICATION = "deployer.asgi.application"
WSGI_APPLICATION = "deployer.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db(
        "DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'greenlight.sqlite3'}"
    ),
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
    },
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE = {
    # re-queue steps whose worker died, expire gates, terminate retired instances
    "sweep": {"task": "releases.tasks.sweep", "schedule": env.float("SWEEP_SECONDS", default=10.0)},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# A step waiting on AWS looks again after WAIT_POLL_MIN seconds, then backs off
# to WAIT_POLL_MAX (both times the environment's time scale), never more often
# than every WAIT_POLL_FLOOR seconds. The worker is free in between.
WAIT_POLL_MIN = env.float("WAIT_POLL_MIN", default=2.0)
WAIT_POLL_MAX = env.float("WAIT_POLL_MAX", default=30.0)
WAIT_POLL_FLOOR = env.float("WAIT_POLL_FLOOR", default=0.2)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "EXCEPTION_HANDLER": "releases.api.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "static")))
# WhiteNoise serves static files without DEBUG; it finds them where they are
# (no collectstatic needed for a demo or the tests), and from STATIC_ROOT
# after `collectstatic` in a container.
WHITENOISE_USE_FINDERS = True

# Repositories at file:// URLs read the server's own disk: only the sandbox
# (`make demo`, the tests) needs them. Off by default.
ALLOW_FILE_REPOSITORIES = env.bool("ALLOW_FILE_REPOSITORIES", default=False)

# The sandbox writes its endpoints here (`manage.py sandbox`).
SANDBOX_FILE = VAR_DIR / "sandbox.json"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
