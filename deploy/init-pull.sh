#!/usr/bin/env bash
# Pull a model (and, optionally, an image) into the node's nekko-sm cache, then exec an
# inference engine on the model: the shape of a node's or a pod's init script.
#
#   MODEL_URL=hf:///unsloth/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q2_K.gguf \
#   IMAGE_URL=oci://ghcr.io/acme/llm-adapters:v1 \
#   deploy/init-pull.sh --host 0.0.0.0 --port 8080
#
# Arguments go to the engine. Environment:
#   MODEL_URL       the model: hf://, oci:// or http(s):// (required)
#   MODEL_DIGEST    sha256:HEX the model file must have (optional)
#   IMAGE_URL       an image or artifact to have in the cache too (optional); its path is
#                   given to the engine as NEKKO_IMAGE_PATH
#   IMAGE_PLATFORM  os/arch[/variant] of the image, or "all" (default: the host's)
#   REGISTRY_TOKEN  a Bearer token for the image's registry (optional)
#   HF_TOKEN        a Hugging Face token, for gated or private models (read by nekko-sm)
#   NEKKO_PYZ       where nekko-sm.pyz is (default /usr/local/lib/nekko/nekko-sm.pyz)
#   ATTEMPTS        tries per pull before giving up (default 5); a retry resumes the download
#   ENGINE          the engine to exec (default llama-server, run as: ENGINE -m MODEL ARGS)
# nekko-sm itself reads CACHE_DIR, HTTPS_PROXY, NEKKO_REGISTRY_MIRRORS ... (nekko-sm(1)).
#
# Exit status (when the engine is not reached): 1 a pull failed ATTEMPTS times, 2 bad input
# (no MODEL_URL, a bad URL, digest or platform: retrying cannot help).
set -euo pipefail

NEKKO_PYZ=${NEKKO_PYZ:-/usr/local/lib/nekko/nekko-sm.pyz}
ATTEMPTS=${ATTEMPTS:-5}
ENGINE=${ENGINE:-llama-server}

log() { echo "init-pull: $*" >&2; }

nekko() { python3 "$NEKKO_PYZ" "$@"; }

# pull URL [PULL OPTIONS...]: returns when URL is complete in the cache, else exits.
# nekko-sm pull: 0 done (downloaded now or already there), 1 failed, 2 bad input.
pull() {
  local url=$1 attempt=1 status
  shift
  while :; do
    status=0
    if [ -n "${PULL_SECRET:-}" ]; then
      # on stdin, not the command line: a token there is visible to every user in ps
      printf '%s\n' "$PULL_SECRET" | nekko pull --credentials-file - "$@" "$url" >/dev/null || status=$?
    else
      nekko pull "$@" "$url" >/dev/null || status=$?
    fi
    case $status in
      0)
        return 0 ;;
      2)
        log "$url: bad URL, option or configuration (exit 2): not retrying"
        exit 2 ;;
      *)
        if [ "$attempt" -ge "$ATTEMPTS" ]; then
          log "$url: failed $attempt times (last exit $status): giving up"
          exit 1
        fi
        # 401/403/404 fail the same way every time, but a dropped connection or a full
        # disk does not, and what was downloaded so far is kept: the next try resumes.
        log "$url: failed (exit $status); try $((attempt + 1)) of $ATTEMPTS in $((attempt * 10))s"
        sleep $((attempt * 10))
        attempt=$((attempt + 1)) ;;
    esac
  done
}

# path URL: what an engine should open (a file, or a directory of named links).
# nekko-sm path: 0 complete, 3 incomplete, 4 absent.
path_of() {
  local status=0 p
  p=$(nekko path "$1") || status=$?
  if [ "$status" -ne 0 ]; then
    log "$1: not complete in the cache after the pull (path exit $status)"
    exit 1
  fi
  printf '%s\n' "$p"
}

if [ -z "${MODEL_URL:-}" ]; then
  log "set MODEL_URL to the model to serve, e.g. hf:///ORG/NAME/FILE.gguf"
  exit 2
fi
if [ ! -r "$NEKKO_PYZ" ]; then
  log "$NEKKO_PYZ not found: set NEKKO_PYZ to where nekko-sm.pyz is"
  exit 2
fi

model_opts=()
if [ -n "${MODEL_DIGEST:-}" ]; then
  model_opts+=(--digest "$MODEL_DIGEST")
fi
log "pulling $MODEL_URL"
pull "$MODEL_URL" "${model_opts[@]}"
MODEL=$(path_of "$MODEL_URL")
log "model: $MODEL"

if [ -n "${IMAGE_URL:-}" ]; then
  image_opts=()
  if [ -n "${IMAGE_PLATFORM:-}" ]; then
    image_opts+=(--platform "$IMAGE_PLATFORM")
  fi
  log "pulling $IMAGE_URL"
  PULL_SECRET=${REGISTRY_TOKEN:-} pull "$IMAGE_URL" "${image_opts[@]}"
  NEKKO_IMAGE_PATH=$(path_of "$IMAGE_URL")
  export NEKKO_IMAGE_PATH
  log "image: $NEKKO_IMAGE_PATH"
fi

exec "$ENGINE" -m "$MODEL" "$@"
