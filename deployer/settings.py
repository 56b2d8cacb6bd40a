"""Greenlight settings.

Everything that differs between machines comes from environment variables
(12-factor, read with django-environ); the defaults make `make demo` work on a
laptop with nothing configured. The README lists every variable.
"""

import os
import secrets
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

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
    return secret_key_file(VAR_DIR / "secret_key")


def secret_key_file(path: Path) -> str:
    """The key in `path`, created with mode 0600 if missing. A file others may
    read is made 0600 first: local tasks may run as another user of this
    machine (LOCAL_TASK_USER), and the key signs every session."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    # a directory of our own: it also holds the demo's database and the sandbox's keys
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # written whole under another name, 0600 from the start whatever the umask,
    # then linked in place: a process starting at the same time reads one key
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(secrets.token_urlsafe(50))
    try:
        os.link(draft, path)
    except FileExistsError:
        pass  # another process won
    finally:
        draft.unlink()
    return path.read_text().strip()


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
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: no CDN, and 'self' in the CSP covers them
    "channels",
    "django_htmx",
    "axes",
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
    "releases.security.SignedOutFragmentMiddleware",
    "csp.middleware.CSPMiddleware",
    "releases.security.NoStoreMiddleware",
    # last, as django-axes asks: it turns a lockout flagged during sign-in into the lockout page
    "axes.middleware.AxesMiddleware",
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
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo's SQLite serves the web server and a worker at once. A write
    # transaction takes the lock when it begins (IMMEDIATE), so two never
    # deadlock upgrading a read lock, and waits up to SQLITE_TIMEOUT seconds
    # for it; WAL lets pages read while someone writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "timeout": env.float("SQLITE_TIMEOUT", default=20.0),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    })
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

# channels-redis waits for a socket's next message with a blocking pop of 5 s
# (its own constant, below); redis-py gives up on a connection that
# says nothing for socket_timeout, 5 s by default. Equal, so every idle socket
# was closed (1011) every few seconds. The socket timeout is longer than the
# pop, so only a Redis that really stopped answering ends a socket (it is
# still noticed: keepalive, and a pop that does not answer in time).
CHANNEL_LAYER_BRPOP_SECONDS = 5  # channels_redis.core.RedisChannelLayer.brpop_timeout
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{
            "address": REDIS_URL,
            "socket_timeout": CHANNEL_LAYER_BRPOP_SECONDS + 10,
            "socket_connect_timeout": 2,
            "socket_keepalive": True,
        }]},
    },
}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
# A worker holds the step it runs by a lease of LEASE_SECONDS on the step's
# row, renewed every third of that; the sweep, every SWEEP_SECONDS, hands back
# a step whose lease ran out. So a dead (or paused) worker's step runs again
# within LEASE_SECONDS + SWEEP_SECONDS, and a worker that finds its lease gone
# stops before it touches AWS or a host again.
LEASE_SECONDS = env.float("LEASE_SECONDS", default=30.0)
SWEEP_SECONDS = env.float("SWEEP_SECONDS", default=10.0)
# How often old baked images are deleted: it lists every environment's images in AWS
CLEANUP_SECONDS = env.float("CLEANUP_SECONDS", default=600.0)
if not LEASE_SECONDS >= 1:
    raise ImproperlyConfigured(f"LEASE_SECONDS is {LEASE_SECONDS:g}: a step's lease needs at least 1 second")
if not SWEEP_SECONDS > 0:
    raise ImproperlyConfigured(f"SWEEP_SECONDS is {SWEEP_SECONDS:g}: the sweep needs a period above 0 seconds")
if not CLEANUP_SECONDS > 0:
    raise ImproperlyConfigured(f"CLEANUP_SECONDS is {CLEANUP_SECONDS:g}: the clean-up needs a period above 0 seconds")
# A worker must outlive a Redis restart. With kombu's ack emulation, a worker
# that loses Redis while it holds an unacknowledged message (a task at work, or
# a countdown waiting in memory) crashes restoring it: "Unrecoverable error:
# AttributeError('NoneType' object has no attribute 'hostname')", because the
# broken connection is torn down before the message is put back. Without ack
# emulation a message leaves Redis when a worker takes it; one that a dead or
# disconnected worker never finished is not lost work, only a lost nudge: the
# database holds the release, and the sweep (leases, due waits, queued
# releases) nudges it again. That is also what notices a dead worker, never
# Redis's visibility timeout.
CELERY_BROKER_TRANSPORT_OPTIONS = {"ack_emulation": False}
# A task at work when Redis goes away finishes its step (it needs the database,
# not Redis); cancelling it would throw that work away for the sweep to redo.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_BEAT_SCHEDULE = {
    # re-queue steps whose worker died, expire gates, terminate retired instances
    "sweep": {"task": "releases.tasks.sweep", "schedule": SWEEP_SECONDS},
    # delete baked images beyond each environment's last N (releases/cleanup.py)
    "clean-up": {"task": "releases.tasks.clean_up", "schedule": CLEANUP_SECONDS},
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
# django-axes counts failed sign-ins (both sign-in pages, and the password a
# person re-enters to create or rotate a token) and locks out after
# LOGIN_FAILURE_LIMIT of them for LOGIN_COOLOFF_MINUTES. It checks first, so a
# locked-out client is refused even with the right password.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
# in hours, as axes reads a float; 0 minutes: locked until an administrator unlocks
AXES_COOLOFF_TIME = env.float("LOGIN_COOLOFF_MINUTES", default=15.0) / 60 or None
# By default a username is locked from the address that failed (so a stranger
# cannot lock a person out from everywhere); `ip_address` also locks an address
# that tries many names. "+" joins parameters into one combination.
AXES_LOCKOUT_PARAMETERS = [
    part.split("+") if "+" in part else part
    for part in env.list("LOGIN_LOCKOUT_BY", default=["username+ip_address"])
]
# The client address is REMOTE_ADDR unless LOGIN_PROXY_COUNT proxies are in
# front (then the address they add to X-Forwarded-For): a client cannot escape
# a lockout by sending its own X-Forwarded-For.
AXES_IPWARE_PROXY_COUNT = env.int("LOGIN_PROXY_COUNT", default=0) or None
AXES_IPWARE_META_PRECEDENCE_ORDER = (
    ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR") if AXES_IPWARE_PROXY_COUNT else ("REMOTE_ADDR",)
)
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "releases.security.lockout_response"
AXES_VERBOSE = False

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # hashed keys (releases.ApiToken); DRF's own authtoken app is not installed
        "releases.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "EXCEPTION_HANDLER": "releases.api.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The API's OpenAPI 3 schema (/api/schema/) and its docs page (/api/docs/),
# described in releases/openapi.py. Only signed-in people read them (a token or
# a session, as the API itself): the schema says nothing secret, but it is a map.
SPECTACULAR_SETTINGS = {
    "TITLE": "Greenlight API",
    "DESCRIPTION": "Bake-and-swap releases on EC2: start them, decide their gates, read their logs and the audit "
                   "trail. Errors are JSON `{\"error\": \"...\"}`, with `field` when one input is at fault.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SCHEMA_PATH_PREFIX": "/api/",
    # the docs page's files come from drf-spectacular-sidecar, not a CDN
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # no call to an outside validator from the docs page
    "SWAGGER_UI_SETTINGS": {"validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "releases.openapi.closed_request_bodies"],
    "ENUM_NAME_OVERRIDES": {
        "ReleaseStatus": "releases.models.Release.Status",
        "StepStatus": "releases.models.Step.Status",
        "StepLabel": "releases.selectors.TIMELINE_LABELS",
        "RetryVerdict": "releases.failures.RETRY",
    },
}

# HTTPS, for a deployment behind TLS (docs/production.env.example). The
# defaults keep the laptop demo on plain http working.
_proxy_ssl_header = env.list("SECURE_PROXY_SSL_HEADER", default=[])
SECURE_PROXY_SSL_HEADER = tuple(_proxy_ssl_header) if _proxy_ssl_header else None
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# the load balancer's health check asks over plain http
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SESSION_COOKIE_AGE = env.int("SESSION_COOKIE_AGE", default=60 * 60 * 12)
X_FRAME_OPTIONS = "DENY"

# No inline script or style anywhere: every script is a file under static/js
# (htmx's own indicator style is turned off in base.html). connect-src 'self'
# covers the release page's websocket on the same host.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
    },
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

# The bare clone of a repository (the picker's recent commits, what a release
# changes) is fetched again only when it is older than this many seconds; so
# is a worker's reading of the recent commits (releases/tasks.py).
REPOSITORY_FRESH_SECONDS = env.float("REPOSITORY_FRESH_SECONDS", default=60.0)

# The system user a recipe's local tasks run as (with its primary group only);
# empty: the worker's own user. Switching takes a worker running as root; a
# worker that cannot switch fails the step rather than run the task as itself.
LOCAL_TASK_USER = env.str("LOCAL_TASK_USER", default="")

# Preflight (releases/preflight.py) runs on a worker, where releases run: the
# web process asks one and waits up to PREFLIGHT_TIMEOUT seconds for its answer.
# With PREFLIGHT_BEFORE_RELEASE (the default) the wizard's review step shows it
# and starting a release (page or API) refuses when a check failed.
PREFLIGHT_BEFORE_RELEASE = env.bool("PREFLIGHT_BEFORE_RELEASE", default=True)
PREFLIGHT_TIMEOUT = env.float("PREFLIGHT_TIMEOUT", default=120.0)

# A new instance's SSH host key is taken from its console output (cloud-init
# prints it there), waited for up to the environment's SSH limit; with no key
# by then the step fails. True trusts the key the instance presents at first
# contact instead, for images that print no keys: weaker (whoever answers at
# that address first is believed), so off unless an administrator says so.
SSH_TRUST_FIRST_CONTACT = env.bool("SSH_TRUST_FIRST_CONTACT", default=False)

# Notifications (releases/notifications.py): links in them point at GREENLIGHT_URL,
# the dashboard's address as people reach it. Email goes through Django's mail
# settings, from EMAIL_URL (smtp://user:password@host:587, smtp+tls:// for STARTTLS, smtp+ssl:// for TLS; or
# consolemail://, the default: messages are written to the worker's output, so
# a laptop sends nothing by surprise; `make demo` points it at the sandbox's
# inbox). Slack and webhook posts time out after
# NOTIFY_CONNECT_TIMEOUT s to connect and NOTIFY_TIMEOUT s in all, so a dead
# receiver never holds a worker long. A failed delivery is tried again after
# NOTIFY_RETRY_SECONDS, doubling up to NOTIFY_RETRY_MAX_SECONDS, and given up
# on after NOTIFY_ATTEMPTS tries.
GREENLIGHT_URL = env.str("GREENLIGHT_URL", default="http://127.0.0.1:8000")
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
EMAIL_TIMEOUT = env.float("EMAIL_TIMEOUT", default=10.0)
NOTIFY_FROM = env.str("NOTIFY_FROM", default="Greenlight <greenlight@localhost>")
NOTIFY_CONNECT_TIMEOUT = env.float("NOTIFY_CONNECT_TIMEOUT", default=3.0)
NOTIFY_TIMEOUT = env.float("NOTIFY_TIMEOUT", default=10.0)
NOTIFY_RETRY_SECONDS = env.float("NOTIFY_RETRY_SECONDS", default=5.0)
NOTIFY_RETRY_MAX_SECONDS = env.float("NOTIFY_RETRY_MAX_SECONDS", default=300.0)
NOTIFY_ATTEMPTS = env.int("NOTIFY_ATTEMPTS", default=6)
if not GREENLIGHT_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(f"GREENLIGHT_URL is {GREENLIGHT_URL!r}: the dashboard's address, such as https://greenlight.example.com")
if not NOTIFY_ATTEMPTS >= 1:
    raise ImproperlyConfigured(f"NOTIFY_ATTEMPTS is {NOTIFY_ATTEMPTS}: a notification needs at least 1 attempt")
if not (0 < NOTIFY_CONNECT_TIMEOUT <= NOTIFY_TIMEOUT and EMAIL_TIMEOUT > 0):
    raise ImproperlyConfigured("NOTIFY_CONNECT_TIMEOUT, NOTIFY_TIMEOUT and EMAIL_TIMEOUT must be above 0 seconds, "
                               "and NOTIFY_CONNECT_TIMEOUT no more than NOTIFY_TIMEOUT")
if not 0 < NOTIFY_RETRY_SECONDS <= NOTIFY_RETRY_MAX_SECONDS:
    raise ImproperlyConfigured("NOTIFY_RETRY_SECONDS must be above 0 and no more than NOTIFY_RETRY_MAX_SECONDS")

# The sandbox writes its endpoints here (`manage.py sandbox`).
SANDBOX_FILE = VAR_DIR / "sandbox.json"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    # no secret reaches a log line: the redaction of release logs applies here too
    "filters": {"redact": {"()": "deployer.redact.LogFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
