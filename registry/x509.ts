// @peculiar/x509 needs the Reflect metadata polyfill loaded before it evaluates; importing it
// through this module is the one way the project gets it, so import order can never break that.
import 'reflect-metadata';
import { webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

export * from '@peculiar/x509';
