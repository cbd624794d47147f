/**
 * The sidecar's TLS identity: a P-256 key generated inside the TPM (tpm2-pkcs11), the carrier
 * certificate `machine-client.pem` that presents its public key and the identity extension, and
 * the ONE `tls.SecureContext` whose handshake signatures the TPM makes through OpenSSL's libp11
 * PKCS#11 engine. Everything engine-specific lives here, so a provider-based implementation can
 * replace this module when Node drops engines (DEP0183) without touching the session or proxy.
 *
 * How pkcs11js (tpm/) and the engine share tpm2-pkcs11 in one process, measured on this machine:
 * - Both dlopen the same libtpm2_pkcs11.so, so they share ONE module instance: one
 *   C_Initialize/C_Finalize state and one login state per token. Whoever calls C_Finalize tears
 *   down the other's sessions too: a handshake after pkcs11js finalised fails with
 *   "Cryptoki not initialized" (p11_ec.c), and a second C_Login from either side returns
 *   CKR_USER_ALREADY_LOGGED_IN without checking the PIN.
 * - So key management runs first and is finished before the engine is touched: `ensureTpmKey`
 *   opens the token with pkcs11js, creates the token/key if missing, reads the public key and the
 *   key's attributes, and closes the token, which finalises the module (tpm/ owns the
 *   initialisation then). The engine then initialises the module afresh and stays its only user.
 *   That first pkcs11js login is also where a wrong PIN is caught, as a typed TpmError, before
 *   the engine ever sees a PIN. A short-lived child process would isolate the two completely but
 *   costs ~0.5 s of Node + tsx start-up for nothing the ordering does not already give.
 * - Later pkcs11js users in the same process (tests reading key attributes) find the module
 *   initialised (CKR_CRYPTOKI_ALREADY_INITIALIZED), and tpm/token.ts then neither logs out nor
 *   finalises: the engine keeps working. Only `TlsIdentity.close()` finalises, at shutdown, so
 *   tpm2-pkcs11 flushes its TPM sessions and objects (which matters without a resource manager).
 *
 * How the engine is loaded:
 * - Node passes `privateKeyEngine` to OpenSSL's ENGINE_by_id. Node's bundled OpenSSL has no
 *   engines directory, so a bare id is not found; a full path is loaded through the `dynamic`
 *   engine, but on this machine that works only ONCE per process (a second context fails with
 *   "engine routines::init failed / no such engine") and prints "bad engine id" to stderr.
 * - Given the full path of `pkcs11.so`, we therefore point OPENSSL_ENGINES (read by
 *   ENGINE_by_id at call time) at its directory and ask for the engine by its id `pkcs11`.
 *   OpenSSL then loads it once, keeps it in its engine list, and every context shares the one
 *   libp11 context: a second context (certificate renewal, tests) costs ~1 ms, and dropping an
 *   old context does not finalise the module under a newer one. A file not named `pkcs11.so`
 *   is passed to Node as the full path (one context per process).
 * - libp11 reads PKCS11_MODULE_PATH when the engine is first bound, so it is set before that.
 *
 * PINs: the engine gets `pin-source=file:` naming a private temp file (tmpfs when available)
 * that exists only while the context is built; libp11 keeps the PIN in memory for re-logins.
 * A `pin-value=` URI would do, but libp11 prints the whole URI to stderr whenever a key is not
 * found or the login fails, which would put the PIN into logs. libp11 0.4.12 reads the file
 * verbatim (a trailing newline becomes part of the PIN), so the file holds exactly the PIN.
 * Error messages here name tokens and labels only, and are scrubbed of the PIN on top.
 */
import { accessSync, constants as fsConstants, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve as resolvePath } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import pkcs11js from 'pkcs11js';
import type { Logger } from 'pino';
import { createCarrierCertificate } from '../../registry/carrier-certificate.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { AgentGatewayError } from '../../registry/errors.js';
import { encodeIdentityExtensionValue, readPeerIdentity } from '../../registry/identity.js';
import { X509Certificate } from '../../registry/x509.js';
import { TpmError, pkcs11ReturnValue } from '../../tpm/errors.js';
import { DEFAULT_PKCS11_ENGINE, DEFAULT_TPM2_PKCS11_MODULE } from '../../core/platform.js';
import { openToken } from '../../tpm/token.js';

/** libp11's engine id, fixed by the library. */
const LIBP11_ENGINE_ID = 'pkcs11';

export type TlsIdentityErrorCode =
  | 'ERR_TLS_IDENTITY'
  | 'ERR_TLS_IDENTITY_PIN_INCORRECT'
  | 'ERR_TLS_IDENTITY_PIN_LOCKED'
  | 'ERR_TLS_IDENTITY_TOKEN_NOT_FOUND'
  | 'ERR_TLS_IDENTITY_KEY_NOT_FOUND'
  | 'ERR_TLS_IDENTITY_KEY_MISMATCH'
  | 'ERR_TLS_IDENTITY_KEY_EXPORTABLE'
  | 'ERR_TLS_IDENTITY_TPM_UNAVAILABLE'
  | 'ERR_TLS_IDENTITY_ENGINE'
  | 'ERR_TLS_IDENTITY_CERTIFICATE'
  | 'ERR_TLS_IDENTITY_INVALID_ARGUMENT';

/** Every failure of this module. Messages name tokens, labels and files, never a PIN. */
export class TlsIdentityError extends AgentGatewayError {
  declare readonly code: TlsIdentityErrorCode;
  constructor(code: TlsIdentityErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

const TPM_CODE_MAP: Readonly<Partial<Record<string, TlsIdentityErrorCode>>> = {
  ERR_TPM_PIN_INCORRECT: 'ERR_TLS_IDENTITY_PIN_INCORRECT',
  ERR_TPM_PIN_LOCKED: 'ERR_TLS_IDENTITY_PIN_LOCKED',
  ERR_TPM_PIN_INVALID: 'ERR_TLS_IDENTITY_PIN_INCORRECT',
  ERR_TPM_TOKEN_NOT_FOUND: 'ERR_TLS_IDENTITY_TOKEN_NOT_FOUND',
  ERR_TPM_KEY_NOT_FOUND: 'ERR_TLS_IDENTITY_KEY_NOT_FOUND',
  ERR_TPM_UNAVAILABLE: 'ERR_TLS_IDENTITY_TPM_UNAVAILABLE',
  ERR_TPM_MODULE_LOAD_FAILED: 'ERR_TLS_IDENTITY_TPM_UNAVAILABLE',
  ERR_TPM_INVALID_ARGUMENT: 'ERR_TLS_IDENTITY_INVALID_ARGUMENT',
};

const TPM_HINTS: Readonly<Partial<Record<TlsIdentityErrorCode, string>>> = {
  ERR_TLS_IDENTITY_PIN_INCORRECT: 'check AGENT_GATEWAY_TPM_USER_PIN or --user-pin-file; repeated wrong PINs trigger the TPM dictionary-attack lockout',
  ERR_TLS_IDENTITY_TOKEN_NOT_FOUND: 'set AGENT_GATEWAY_TPM_SO_PIN (or --so-pin-file) to create it, or check --token-label and TPM2_PKCS11_STORE',
  ERR_TLS_IDENTITY_TPM_UNAVAILABLE: 'check --tcti / TPM2_PKCS11_TCTI (and DBUS_SESSION_BUS_ADDRESS for tabrmd)',
};

function scrub(text: string, secrets: readonly (string | undefined)[]): string {
  let out = text;
  for (const secret of secrets) {
    if (!secret) continue;
    for (const form of new Set([secret, encodeURIComponent(secret), percentEncode(secret)])) out = out.split(form).join('[redacted]');
  }
  return out;
}

function fromTpmError(error: unknown, secrets: readonly (string | undefined)[]): TlsIdentityError {
  if (error instanceof TlsIdentityError) return error;
  const code: TlsIdentityErrorCode = error instanceof TpmError ? (TPM_CODE_MAP[error.code] ?? 'ERR_TLS_IDENTITY') : 'ERR_TLS_IDENTITY';
  const message = scrub(error instanceof Error ? error.message : String(error), secrets);
  const hint = TPM_HINTS[code];
  return new TlsIdentityError(code, hint ? `${message}; ${hint}` : message, { cause: error });
}

/** RFC 7512 percent-encoding: everything but unreserved characters (libp11 decodes %XX). */
function percentEncode(value: string): string {
  return Array.from(Buffer.from(value, 'utf8'), (byte) => {
    const c = String.fromCharCode(byte);
    return /[A-Za-z0-9\-._~]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }).join('');
}

// ---------------------------------------------------------------------------------------------
// Step 1: the key, through pkcs11js

export interface TpmKeyOptions {
  readonly tokenLabel: string;
  readonly keyLabel: string;
  readonly userPin: string;
  /** Only needed to create the token; without it a missing token is an error. */
  readonly soPin?: string;
  /** tpm2-pkcs11's TCTI (TPM2_PKCS11_TCTI); unset keeps the environment's. */
  readonly tcti?: string;
  /** tpm2-pkcs11's store directory (TPM2_PKCS11_STORE); unset keeps the environment's. */
  readonly storeDir?: string;
  /** libtpm2_pkcs11.so; the engine loads the same file. */
  readonly modulePath?: string;
}

export interface TpmKeyInfo {
  readonly spkiDer: Buffer;
  readonly fingerprint: string;
  /** CKA_ID of the key pair, hex (what a libp11 URI could name with `id=`). */
  readonly keyId: string;
  readonly tokenCreated: boolean;
  readonly keyCreated: boolean;
}

/**
 * Makes sure the token and a P-256 key labelled `keyLabel` exist in the TPM, and returns its
 * public key. The key is generated inside the TPM (sensitive, never extractable); a key that
 * was imported or could be exported is refused, because this identity must never leave the TPM.
 * Closes the token before returning (see the header: the engine must be the module's only user).
 */
export function ensureTpmKey(options: TpmKeyOptions): TpmKeyInfo {
  const secrets = [options.userPin, options.soPin];
  let token;
  try {
    token = openToken({
      tokenLabel: options.tokenLabel,
      userPin: options.userPin,
      ...(options.soPin !== undefined ? { soPin: options.soPin, createIfMissing: true } : {}),
      ...(options.tcti !== undefined ? { tcti: options.tcti } : {}),
      ...(options.storeDir !== undefined ? { storeDir: options.storeDir } : {}),
      ...(options.modulePath !== undefined ? { modulePath: options.modulePath } : {}),
    });
  } catch (error) {
    throw fromTpmError(error, secrets);
  }
  try {
    let key = token.findKeyOrUndefined(options.keyLabel);
    const keyCreated = key === undefined;
    key ??= token.generateP256Key(options.keyLabel);
    const attributes = token.privateKeyAttributes(key, [pkcs11js.CKA_SENSITIVE, pkcs11js.CKA_EXTRACTABLE, pkcs11js.CKA_NEVER_EXTRACTABLE, pkcs11js.CKA_ALWAYS_SENSITIVE]);
    const flag = (type: number) => attributes.get(type)?.[0] === 1;
    if (!flag(pkcs11js.CKA_SENSITIVE) || flag(pkcs11js.CKA_EXTRACTABLE) || !flag(pkcs11js.CKA_NEVER_EXTRACTABLE) || !flag(pkcs11js.CKA_ALWAYS_SENSITIVE)) {
      throw new TlsIdentityError(
        'ERR_TLS_IDENTITY_KEY_EXPORTABLE',
        `TPM token "${options.tokenLabel}", key "${options.keyLabel}" was not generated inside the TPM as sensitive and never extractable; refusing to use it (delete it, or choose another --key-label, and let the sidecar generate one)`,
      );
    }
    const spkiDer = token.publicKeySpkiDer(key);
    return { spkiDer, fingerprint: spkiFingerprint(spkiDer), keyId: key.id.toString('hex'), tokenCreated: token.created, keyCreated };
  } catch (error) {
    throw fromTpmError(error, secrets);
  } finally {
    token.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Step 2: the carrier certificate

export interface CarrierCertificateResult {
  readonly path: string;
  readonly pem: string;
  /** What differs from the file that was there before (it is rewritten on every start anyway). */
  readonly change: 'created' | 'key_changed' | 'identity_changed' | 'key_and_identity_changed' | 'renewed';
}

/** What a carrier certificate file presents, or undefined when there is none or it does not parse. */
export function readCarrierCertificate(path: string, extensionOid: string): { identity?: string; spkiDer: Buffer } | undefined {
  let pem: string;
  try {
    pem = readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
  try {
    const certificate = new X509Certificate(pem);
    const peer = readPeerIdentity(new Uint8Array(certificate.rawData), extensionOid);
    if (!peer.spkiDer) return undefined;
    return { ...(peer.ok ? { identity: peer.identity } : {}), spkiDer: peer.spkiDer };
  } catch {
    return undefined;
  }
}

/**
 * Writes `machine-client.pem` for this key and identity, atomically (temp file + rename, so a
 * reader never sees half a certificate). It is public material: mode 0644.
 */
export async function writeCarrierCertificate(options: { path: string; spkiDer: Uint8Array; identity: string; extensionOid: string }): Promise<CarrierCertificateResult> {
  const path = resolvePath(options.path);
  const previous = readCarrierCertificate(path, options.extensionOid);
  let pem: string;
  try {
    pem = await createCarrierCertificate({ subjectSpkiDer: options.spkiDer, extensionOid: options.extensionOid, identity: options.identity });
  } catch (error) {
    throw new TlsIdentityError('ERR_TLS_IDENTITY_CERTIFICATE', `cannot build the carrier certificate: ${(error as Error).message}`, { cause: error });
  }
  const temporary = `${path}.tmp-${process.pid}`;
  try {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(temporary, `${pem.trim()}\n`, { mode: 0o644 });
    renameSync(temporary, path);
  } catch (error) {
    rmSync(temporary, { force: true });
    throw new TlsIdentityError('ERR_TLS_IDENTITY_CERTIFICATE', `cannot write the carrier certificate ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { cause: error });
  }
  let change: CarrierCertificateResult['change'] = 'created';
  if (previous) {
    const keyChanged = !previous.spkiDer.equals(Buffer.from(options.spkiDer));
    const identityChanged = previous.identity !== options.identity;
    change = keyChanged && identityChanged ? 'key_and_identity_changed' : keyChanged ? 'key_changed' : identityChanged ? 'identity_changed' : 'renewed';
  }
  return { path, pem, change };
}

// ---------------------------------------------------------------------------------------------
// Step 3: the secure context, through the engine

export interface EngineContextOptions {
  /** Carrier certificate PEM holding the TPM key's public key. */
  readonly certPem: string;
  /** CA certificates (PEM) that verify the gateway; unset uses Node's default roots. */
  readonly ca?: string | Buffer;
  readonly tokenLabel: string;
  readonly keyLabel: string;
  readonly userPin: string;
  readonly modulePath?: string;
  readonly enginePath?: string;
}

let engineModulePath: string | undefined;
let fullPathEngineLoaded = false;

/** Where to put the PIN file: tmpfs when there is one, so the PIN never reaches a disk. */
function pinDirectoryRoot(): string {
  for (const dir of [process.env.XDG_RUNTIME_DIR, '/dev/shm']) {
    if (!dir) continue;
    try {
      if (statSync(dir).isDirectory()) {
        accessSync(dir, fsConstants.W_OK);
        return dir;
      }
    } catch {
      // not usable; try the next
    }
  }
  return tmpdir();
}

function engineErrorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown })?.code;
  return typeof code === 'string' ? code : undefined;
}

/**
 * Builds the TLS context whose private key is the TPM key, named by a PKCS#11 URI for libp11.
 * The certificate must hold that key's public key (OpenSSL checks: ERR_TLS_IDENTITY_KEY_MISMATCH).
 */
export function createTpmSecureContext(options: EngineContextOptions): SecureContext {
  const modulePath = options.modulePath ?? DEFAULT_TPM2_PKCS11_MODULE;
  const enginePath = options.enginePath ?? DEFAULT_PKCS11_ENGINE;
  const where = `TPM token "${options.tokenLabel}", key "${options.keyLabel}"`;
  const secrets = [options.userPin];
  if (!options.userPin) throw new TlsIdentityError('ERR_TLS_IDENTITY_INVALID_ARGUMENT', 'the user PIN must not be empty');
  if (!existsSync(enginePath)) {
    throw new TlsIdentityError('ERR_TLS_IDENTITY_ENGINE', `the libp11 PKCS#11 engine ${enginePath} does not exist (install libengine-pkcs11-openssl, or pass --pkcs11-engine)`);
  }
  if (!existsSync(modulePath)) {
    throw new TlsIdentityError('ERR_TLS_IDENTITY_ENGINE', `the PKCS#11 module ${modulePath} does not exist (install libtpm2-pkcs11-1, or pass --pkcs11-module)`);
  }
  // The engine binds its module once per process (see the header).
  if (engineModulePath !== undefined && engineModulePath !== modulePath) {
    throw new TlsIdentityError('ERR_TLS_IDENTITY_ENGINE', `the PKCS#11 engine is already bound to ${engineModulePath} in this process; it cannot switch to ${modulePath}`);
  }
  let engine: string;
  if (basename(enginePath) === `${LIBP11_ENGINE_ID}.so`) {
    process.env.OPENSSL_ENGINES = dirname(resolvePath(enginePath));
    engine = LIBP11_ENGINE_ID;
  } else {
    if (fullPathEngineLoaded) {
      throw new TlsIdentityError('ERR_TLS_IDENTITY_ENGINE', `${enginePath} is loaded by path, which OpenSSL allows once per process; name the engine file ${LIBP11_ENGINE_ID}.so to build more than one context`);
    }
    engine = enginePath;
  }
  process.env.PKCS11_MODULE_PATH = modulePath;

  const pinDir = mkdtempSync(join(pinDirectoryRoot(), 'agw-sidecar-pin-'));
  try {
    const pinFile = join(pinDir, 'pin');
    writeFileSync(pinFile, options.userPin, { mode: 0o600, flag: 'wx' });
    const identifier = `pkcs11:token=${percentEncode(options.tokenLabel)};object=${percentEncode(options.keyLabel)};type=private?pin-source=file:${percentEncode(pinFile)}`;
    let context: SecureContext;
    try {
      context = createSecureContext({
        cert: options.certPem,
        privateKeyEngine: engine,
        privateKeyIdentifier: identifier,
        ...(options.ca !== undefined ? { ca: options.ca } : {}),
      });
    } catch (error) {
      // The engine may have initialised and logged in before failing (a key mismatch is found
      // last): with no other context in this process, release the module now, or a bare-swtpm
      // TPM keeps the sessions of a process that is about to exit.
      if (engineModulePath === undefined) finalizePkcs11(modulePath);
      const detail = scrub((error as Error).message, secrets);
      switch (engineErrorCode(error)) {
        case 'ERR_OSSL_X509_KEY_VALUES_MISMATCH':
          throw new TlsIdentityError('ERR_TLS_IDENTITY_KEY_MISMATCH', `${where}: the carrier certificate does not hold this key's public key (${detail})`, { cause: error });
        case 'ERR_OSSL_PIN_INCORRECT':
          throw new TlsIdentityError('ERR_TLS_IDENTITY_PIN_INCORRECT', `${where}: the PKCS#11 engine could not log in: PIN incorrect; ${TPM_HINTS.ERR_TLS_IDENTITY_PIN_INCORRECT}`, { cause: error });
        case 'ERR_OSSL_PIN_LOCKED':
          throw new TlsIdentityError('ERR_TLS_IDENTITY_PIN_LOCKED', `${where}: PIN locked (TPM dictionary-attack lockout)`, { cause: error });
        case 'ERR_OSSL_OBJECT_NOT_FOUND':
          throw new TlsIdentityError('ERR_TLS_IDENTITY_KEY_NOT_FOUND', `${where}: the PKCS#11 engine found no such private key (is the token in this TPM2_PKCS11_STORE?)`, { cause: error });
        default:
          throw new TlsIdentityError('ERR_TLS_IDENTITY_ENGINE', `${where}: the PKCS#11 engine ${enginePath} failed: ${detail}`, { cause: error });
      }
    }
    engineModulePath = modulePath;
    if (engine !== LIBP11_ENGINE_ID) fullPathEngineLoaded = true;
    return context;
  } finally {
    rmSync(pinDir, { recursive: true, force: true });
  }
}

/**
 * Finalises tpm2-pkcs11 in this process: the engine's sessions end and the TPM's loaded objects
 * are flushed. Every TPM-backed context is unusable afterwards, so call it at shutdown only.
 * The engine initialised the module, so pkcs11js sees CKR_CRYPTOKI_ALREADY_INITIALIZED and
 * finalises the shared instance; if nobody had it initialised, this is a no-op round trip.
 */
export function finalizePkcs11(modulePath: string = DEFAULT_TPM2_PKCS11_MODULE): void {
  const module = new pkcs11js.PKCS11();
  try {
    module.load(modulePath);
  } catch {
    return; // never loaded, so nothing to finalise
  }
  try {
    try {
      module.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
    } catch (error) {
      if (pkcs11ReturnValue(error) !== 'CKR_CRYPTOKI_ALREADY_INITIALIZED') return;
    }
    module.C_Finalize();
  } catch {
    // finalised already, or the TPM is gone: nothing left to release
  } finally {
    try {
      module.close();
    } catch {
      // the library stays mapped; harmless at shutdown
    }
  }
}

// ---------------------------------------------------------------------------------------------
// All three steps

export interface TlsIdentityOptions extends TpmKeyOptions {
  /** The identity carried in the extension (1-255 bytes of UTF-8, no control characters). */
  readonly identity: string;
  readonly extensionOid: string;
  /** Where to write the carrier certificate (`machine-client.pem`). */
  readonly certOut: string;
  /** CA certificates (PEM) that verify the gateway; unset uses Node's default roots. */
  readonly ca?: string | Buffer;
  readonly enginePath?: string;
  readonly log?: Logger;
}

export interface TlsIdentity {
  /** The one context every gateway (re)connect uses; its handshakes are signed by the TPM. */
  readonly secureContext: SecureContext;
  readonly identity: string;
  readonly spkiDer: Buffer;
  /** `sha256:<hex>` of the SPKI DER, as the gateway logs it. */
  readonly spkiFingerprint: string;
  readonly certPath: string;
  readonly certPem: string;
  readonly key: TpmKeyInfo;
  readonly certificateChange: CarrierCertificateResult['change'];
  /** Finalises PKCS#11 (see finalizePkcs11); the context is unusable afterwards. Idempotent. */
  close(): void;
}

/**
 * Ensures the TPM key, rewrites the carrier certificate for it and the identity, and builds the
 * TLS context. Fails with a TlsIdentityError naming what to fix.
 */
export async function loadTlsIdentity(options: TlsIdentityOptions): Promise<TlsIdentity> {
  try {
    encodeIdentityExtensionValue(options.identity);
  } catch (error) {
    throw new TlsIdentityError('ERR_TLS_IDENTITY_INVALID_ARGUMENT', `identity: ${(error as Error).message}`, { cause: error });
  }
  const key = ensureTpmKey(options);
  options.log?.info(
    { event: 'tpm_key_ready', token: options.tokenLabel, key_label: options.keyLabel, key_created: key.keyCreated, token_created: key.tokenCreated, spki_fingerprint: key.fingerprint },
    key.keyCreated ? 'generated a P-256 key inside the TPM' : 'using the P-256 key in the TPM',
  );
  const certificate = await writeCarrierCertificate({ path: options.certOut, spkiDer: key.spkiDer, identity: options.identity, extensionOid: options.extensionOid });
  options.log?.info(
    { event: 'carrier_certificate_written', path: certificate.path, change: certificate.change, identity: options.identity, extension_oid: options.extensionOid },
    'carrier certificate written',
  );
  const modulePath = options.modulePath ?? DEFAULT_TPM2_PKCS11_MODULE;
  const secureContext = createTpmSecureContext({
    certPem: certificate.pem,
    ...(options.ca !== undefined ? { ca: options.ca } : {}),
    tokenLabel: options.tokenLabel,
    keyLabel: options.keyLabel,
    userPin: options.userPin,
    modulePath,
    ...(options.enginePath !== undefined ? { enginePath: options.enginePath } : {}),
  });
  let closed = false;
  return {
    secureContext,
    identity: options.identity,
    spkiDer: key.spkiDer,
    spkiFingerprint: key.fingerprint,
    certPath: certificate.path,
    certPem: certificate.pem,
    key,
    certificateChange: certificate.change,
    close() {
      if (closed) return;
      closed = true;
      finalizePkcs11(modulePath);
    },
  };
}
