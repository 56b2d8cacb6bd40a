#!/bin/sh
# The demo cookbook's entry point, as chef-solo is knife solo's: run each
# recipe in order, in the instance's own directory, and stop at the first
# that fails. Copied here by the cookbook recipe's local provision tasks.
set -eu
here=$(dirname "$0")
for recipe in "$here"/recipes/*.sh; do
    echo "cookbook: running recipe $(basename "$recipe" .sh)"
    sh "$recipe"
done
echo "cookbook: done"
