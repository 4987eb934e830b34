# Sourced by scripts/demo and scripts/cluster (not run): which Ollama they use.
# Needs: $py (the venv's python), $model, $cache, and a say() function.

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

has_model() {  # $1 = base URL; true when that Ollama answers and has $model
  "$py" - "$1" "$model" <<'PY' 2>/dev/null
import json, sys, urllib.request
url, want = sys.argv[1], sys.argv[2] if ":" in sys.argv[2] else sys.argv[2] + ":latest"
with urllib.request.urlopen(url + "/api/tags", timeout=3) as r:
    names = [m.get("name") for m in json.load(r).get("models", [])]
sys.exit(0 if want in names else 1)
PY
}

# Sets url to an Ollama that has $model, left running by whoever started it: the one at
# OLLAMA_HOST, else the one a previous `scripts/ollama-dev start` runs. Returns 1 when
# neither has it (url is then OLLAMA_HOST's, for the caller's message).
find_ollama() {
  local dev_host
  url="$("$py" -c 'import os; from tokenwire.service import ollama_url_from_env as f; print(f(os.environ.get("OLLAMA_HOST")))')"
  dev_host="$(sed -n 's/^OLLAMA_HOST=//p' "$cache/ollama/current.env" 2>/dev/null || true)"
  if [ -n "${OLLAMA_HOST:-}" ] && has_model "$url"; then
    say "using the Ollama at $url (it has $model; left running)"
  elif [ -n "$dev_host" ] && has_model "http://$dev_host"; then
    url="http://$dev_host"
    say "using the Ollama that scripts/ollama-dev already runs at $url (left running)"
  else
    return 1
  fi
}
