#!/bin/sh
# Create the two secrets docker-compose.yml mounts, once per installation:
#   admin_key   the Admin service's bearer key (keys create|revoke, usage for every tenant)
#   key_pepper  the pepper mixed into stored API-key hashes (SOL_KEY_PEPPER); changing it
#               invalidates every issued API key, so it is created once and kept.
# Existing files are left alone: rerunning never rotates anything by surprise.
set -eu
dir=$(dirname "$0")/secrets
mkdir -p "$dir"
# The directory, not the files, keeps other host users out: compose bind-mounts each file
# as it is, and the server's non-root uid (10001) must be able to read it.
chmod 0700 "$dir"
for name in admin_key key_pepper; do
    if [ -s "$dir/$name" ]; then
        echo "keep    $dir/$name"
        continue
    fi
    python3 -c 'import secrets; print(secrets.token_urlsafe(32), end="")' > "$dir/$name"
    chmod 0644 "$dir/$name"
    echo "created $dir/$name"
done
