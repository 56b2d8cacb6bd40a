# A boot script that brings every service under etc/service back on start,
# the way daemontools would.
set -eu
cat > etc/rc.local <<'SCRIPT'
#!/bin/sh
mkdir -p var/run var/log
for run in etc/service/*/run; do
    [ -f "$run" ] || continue
    name=$(basename $(dirname "$run"))
    setsid sh "$run" >> var/log/$name.log 2>&1 < /dev/null &
    echo $! > var/run/$name.pid
done
SCRIPT
echo "wrote etc/rc.local"
