#!/usr/bin/env node
// Runs the registry CLI through tsx, so `npx agent-gateway-registry` works straight after `npm ci`.
import { register } from 'tsx/esm/api';

register();
await import('../registry-cli/src/main.ts');
