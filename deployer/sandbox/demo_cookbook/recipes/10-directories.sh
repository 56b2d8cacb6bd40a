# What an app server needs before anything is deployed to it.
set -eu
mkdir -p etc/service var/run var/log
command -v git python3
