#!/usr/bin/env node
// Runs the sidecar through tsx, so `npx agent-gateway-sidecar` works straight after `npm ci`.
import { register } from 'tsx/esm/api';

register();
await import('../sidecar/src/main.ts');
