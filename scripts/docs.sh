#!/bin/sh
# Builds the DocC documentation of the two library products, VigilClient and VigilServer, into
# .build/docs/<product> (static HTML for any web server, under /<product>/). `make test` runs it,
# so the catalogs keep building as the code changes.
#
#   scripts/docs.sh
set -e
cd "$(dirname "$0")/.."
mkdir -p .build/docs
rm -rf .build/docs/VigilClient .build/docs/VigilServer
for target in VigilClient VigilServer; do
    swift package --allow-writing-to-directory .build/docs generate-documentation --target "$target" \
        --output-path ".build/docs/$target" --transform-for-static-hosting --warnings-as-errors \
        --hosting-base-path "$target"
done
echo "documentation in .build/docs/VigilClient and .build/docs/VigilServer"
