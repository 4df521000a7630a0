#!/bin/sh
# Create the files deploy/k8s/base's secretGenerator turns into the sol-secrets Secret:
#   admin-key   the Admin service's bearer key
#   key-pepper  the pepper of stored API-key hashes (SOL_KEY_PEPPER); every replica needs
#               the same one, and changing it invalidates every issued API key.
# Existing files are kept: rerunning never rotates anything. To rotate the admin key,
# overwrite base/secrets/admin-key and re-apply (deploy/README.md, "Rotate keys").
set -eu
dir=$(dirname "$0")/base/secrets
mkdir -p "$dir"
chmod 0700 "$dir"
for name in admin-key key-pepper; do
    if [ -s "$dir/$name" ]; then
        echo "keep    $dir/$name"
        continue
    fi
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32), end="")' > "$dir/$name")
    echo "created $dir/$name"
done
