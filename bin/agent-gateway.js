#!/usr/bin/env node
// Runs the TypeScript entry point through tsx, so `npx agent-gateway` works straight after `npm ci`.
import { register } from 'tsx/esm/api';

register();
await import('../gateway/src/main.ts');
