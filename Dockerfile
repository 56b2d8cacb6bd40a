FROM python:3.11-slim
# git: the demo recipe clones the app; openssh-client: local recipe tasks
RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client \
 && rm -rf /var/lib/apt/lists/*
# recipes' local tasks run as this user (LOCAL_TASK_USER), not as the worker
RUN useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin greenlight-task
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN SECRET_KEY=collectstatic python manage.py collectstatic --noinput --verbosity 0
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["python", "-m", "daphne", "-b", "0.0.0.0", "-p", "8000", "deployer.asgi:application"]
