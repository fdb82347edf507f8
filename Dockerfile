# Ferryman image: one image for control plane, edge, connector and client agent
# (deploy/kubernetes/ runs it). Runs as the non-root user 10001; nothing is downloaded at
# build time but the Python dependencies, from the package index through pip.
#   docker build -t ferryman .
#   docker run --rm -v $PWD/pki:/pki -e FERRYMAN_TLS_CA=/pki/ca.pem \
#     -e FERRYMAN_TLS_CERT=/pki/edge-1.pem -e FERRYMAN_TLS_KEY=/pki/edge-1.key \
#     -e FERRYMAN_APPS_FILE=/pki/apps.toml -p 8443:8443 -p 8443:8443/udp ferryman edge
FROM python:3.11-slim

RUN groupadd --system --gid 10001 ferryman \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ferryman --create-home ferryman
WORKDIR /opt/ferryman
COPY pyproject.toml README.md ./
COPY dataplane ./dataplane
COPY control ./control
COPY bench ./bench
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER 10001:10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    FERRYMAN_DATA_DIR=/var/lib/ferryman \
    FERRYMAN_LOG_FORMAT=json \
    FERRYMAN_METRICS_ADDR=0.0.0.0:9100
EXPOSE 8080 8443 8443/udp 9100
ENTRYPOINT ["ferryman"]
CMD ["--help"]
