# hiocluster: one image for the supervisor and the agents of docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hiocluster ./hiocluster
RUN pip install --no-cache-dir .
# the example nodes and topologies, imported from /app (the default --app-dir)
COPY nodes ./nodes
COPY topologies ./topologies
ENTRYPOINT ["hiocluster"]
CMD ["--help"]
