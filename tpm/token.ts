/**
 * TPM-resident P-256 keys through PKCS#11 (pkcs11js over tpm2-pkcs11).
 *
 * Environment read by tpm2-pkcs11 itself, once, when the module is initialised in this process
 * (so set it before the first openToken, or pass `tcti`/`storeDir`, which set it for you):
 * - `TPM2_PKCS11_TCTI`: how to reach the TPM, e.g. `device:/dev/tpmrm0` on a real host, or
 *   `tabrmd:bus_type=session` (with `DBUS_SESSION_BUS_ADDRESS`) for swtpm behind tpm2-abrmd.
 * - `TPM2_PKCS11_STORE`: directory of the token metadata (sqlite). Created here if missing;
 *   without it tpm2-pkcs11 uses /etc/tpm2_pkcs11 or ~/.tpm2_pkcs11.
 * - `TPM2_PKCS11_LOG_LEVEL` (0 errors only, 1 warnings, 2 verbose) and `TSS2_LOG`
 *   (e.g. `all+NONE`): the module and the TSS write diagnostics straight to fd 2.
 *
 * Every call is synchronous on purpose: a PKCS#11 session runs one operation at a time, and a
 * blocking call can never interleave with another on the same session. A swtpm signature takes a
 * few milliseconds; long-lived TLS signing goes through the OpenSSL engine, not through here.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import pkcs11js from 'pkcs11js';
import type { Handle, PKCS11, Template } from 'pkcs11js';
import { p256SpkiFromPoint, rawSignatureToDer } from '../registry/ecdsa.js';
import type { PermissionSigner } from '../registry/signing.js';
import { TpmError, pkcs11ReturnValue, toTpmError } from './errors.js';

import { DEFAULT_TPM2_PKCS11_MODULE } from '../core/platform.js';

/** DER of OID 1.2.840.10045.3.1.7 (prime256v1), the value of CKA_EC_PARAMS. */
export const P256_EC_PARAMS = Buffer.from('06082a8648ce3d030107', 'hex');
const LABEL_MAX_BYTES = 32;
const SHA256_BYTES = 32;

export interface OpenTokenOptions {
  /** Path of the PKCS#11 module; defaults to Debian's tpm2-pkcs11. */
  readonly modulePath?: string;
  readonly tokenLabel: string;
  readonly userPin: string;
  /** Needed only to create the token (or to finish one whose user PIN was never set). */
  readonly soPin?: string;
  readonly createIfMissing?: boolean;
  /** Sets TPM2_PKCS11_TCTI before the module is initialised. */
  readonly tcti?: string;
  /** Sets TPM2_PKCS11_STORE before the module is initialised. */
  readonly storeDir?: string;
}

/** A key pair inside one open token. Handles are valid only while that token stays open. */
export class TpmKey {
  readonly label: string;
  /** CKA_ID shared by the private and public objects (what libp11 URIs can name with `id=`). */
  readonly id: Buffer;
  /** SubjectPublicKeyInfo DER of the P-256 public key. */
  readonly publicKeySpkiDer: Buffer;
  readonly token: TpmToken;
  readonly privateHandle: Handle;

  constructor(token: TpmToken, label: string, id: Buffer, privateHandle: Handle, publicKeySpkiDer: Buffer) {
    this.token = token;
    this.label = label;
    this.id = id;
    this.privateHandle = privateHandle;
    this.publicKeySpkiDer = publicKeySpkiDer;
  }
}

interface LoadedModule {
  readonly path: string;
  readonly pkcs11: PKCS11;
  /** False when someone else (e.g. the libp11 engine) initialised the module in this process. */
  readonly ownsInitialize: boolean;
  readonly tcti: string | undefined;
  readonly store: string | undefined;
  users: number;
}

const modules = new Map<string, LoadedModule>();
const openTokens = new Set<TpmToken>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Finalising lets tpm2-pkcs11 flush TPM sessions and close its sqlite store cleanly.
  process.on('exit', () => {
    for (const token of [...openTokens]) token.close();
  });
}

function checkLabel(kind: string, label: string): void {
  if (typeof label !== 'string' || Buffer.byteLength(label, 'utf8') === 0 || Buffer.byteLength(label, 'utf8') > LABEL_MAX_BYTES) {
    throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `${kind} label must be 1-${LABEL_MAX_BYTES} bytes of UTF-8`);
  }
  if (/[\u0000-\u001f\u007f]/.test(label) || label !== label.trimEnd()) {
    throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `${kind} label must not contain control characters or trailing spaces`);
  }
}

function checkPin(kind: string, pin: unknown): asserts pin is string {
  if (typeof pin !== 'string' || pin.length === 0) throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `${kind} PIN must be a non-empty string`);
}

/** PKCS#11 labels are fixed 32-byte fields padded with spaces; tpm2-pkcs11 rejects NUL padding. */
function paddedLabel(label: string): string {
  return label + ' '.repeat(LABEL_MAX_BYTES - Buffer.byteLength(label, 'utf8'));
}

function unpadLabel(label: string): string {
  return label.replace(/[ \u0000]+$/, '');
}

function prepareEnvironment(options: OpenTokenOptions): void {
  if (options.tcti !== undefined) process.env.TPM2_PKCS11_TCTI = options.tcti;
  if (options.storeDir !== undefined) process.env.TPM2_PKCS11_STORE = options.storeDir;
  const store = process.env.TPM2_PKCS11_STORE;
  if (store) {
    try {
      mkdirSync(store, { recursive: true, mode: 0o700 });
    } catch (error) {
      throw toTpmError(error, `cannot create the tpm2-pkcs11 store directory ${store}`);
    }
  }
}

function acquireModule(path: string, options: OpenTokenOptions): LoadedModule {
  const loaded = modules.get(path);
  if (loaded) {
    // tpm2-pkcs11 reads its environment once: a different TCTI or store would silently be ignored.
    const mismatch = (options.tcti !== undefined && options.tcti !== loaded.tcti) || (options.storeDir !== undefined && options.storeDir !== loaded.store);
    if (mismatch && loaded.ownsInitialize) {
      throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `PKCS#11 module ${path} is already initialised in this process with another TCTI or store; close every token first`);
    }
    loaded.users++;
    return loaded;
  }
  prepareEnvironment(options);
  const pkcs11 = new pkcs11js.PKCS11();
  try {
    pkcs11.load(path);
  } catch (error) {
    throw toTpmError(error, `cannot load PKCS#11 module ${path}`, 'ERR_TPM_MODULE_LOAD_FAILED');
  }
  let ownsInitialize = true;
  try {
    pkcs11.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK });
  } catch (error) {
    if (pkcs11ReturnValue(error) === 'CKR_CRYPTOKI_ALREADY_INITIALIZED') {
      ownsInitialize = false;
    } else {
      try {
        pkcs11.close();
      } catch {
        // the load succeeded; a failing unload changes nothing for the caller
      }
      const env = `TPM2_PKCS11_TCTI=${process.env.TPM2_PKCS11_TCTI ?? '(unset)'}, TPM2_PKCS11_STORE=${process.env.TPM2_PKCS11_STORE ?? '(unset)'}`;
      throw toTpmError(error, `cannot initialise PKCS#11 module ${path}: is the TPM (or tpm2-abrmd and its D-Bus) reachable and the store writable? (${env})`, 'ERR_TPM_UNAVAILABLE');
    }
  }
  const module: LoadedModule = { path, pkcs11, ownsInitialize, tcti: process.env.TPM2_PKCS11_TCTI, store: process.env.TPM2_PKCS11_STORE, users: 1 };
  modules.set(path, module);
  return module;
}

function releaseModule(module: LoadedModule): void {
  if (--module.users > 0) return;
  modules.delete(module.path);
  if (!module.ownsInitialize) return; // whoever initialised it finalises it
  try {
    module.pkcs11.C_Finalize();
  } catch {
    // already finalised, or the TPM went away: nothing left to release
  }
  try {
    module.pkcs11.close();
  } catch {
    // dlclose failures leave only a mapped library behind
  }
}

interface SlotMatch {
  readonly slot: Handle;
  readonly flags: number;
}

function findSlot(pkcs11: PKCS11, tokenLabel: string): SlotMatch | undefined {
  for (const slot of pkcs11.C_GetSlotList(true)) {
    const info = pkcs11.C_GetTokenInfo(slot);
    if (info.flags & pkcs11js.CKF_TOKEN_INITIALIZED && unpadLabel(info.label) === tokenLabel) return { slot, flags: info.flags };
  }
  return undefined;
}

function findEmptySlot(pkcs11: PKCS11): Handle | undefined {
  return pkcs11.C_GetSlotList(true).find((slot) => !(pkcs11.C_GetTokenInfo(slot).flags & pkcs11js.CKF_TOKEN_INITIALIZED));
}

/**
 * Asks the TPM behind a token for a few random bytes through a fresh PKCS#11 session, without
 * logging in: a real round trip through tpm2-pkcs11 and the TCTI, for readiness checks. Shares
 * the module with any other user in the process (the sidecar's OpenSSL engine) and leaves its
 * login state alone. Throws TpmError when the token or the TPM does not answer.
 */
export function probeToken(options: { readonly modulePath?: string; readonly tokenLabel: string }): void {
  const module = acquireModule(options.modulePath ?? DEFAULT_TPM2_PKCS11_MODULE, { tokenLabel: options.tokenLabel, userPin: 'unused' });
  try {
    const match = findSlot(module.pkcs11, options.tokenLabel);
    if (!match) throw new TpmError('ERR_TPM_TOKEN_NOT_FOUND', `no initialised token labelled ${JSON.stringify(options.tokenLabel)}`);
    const session = module.pkcs11.C_OpenSession(match.slot, pkcs11js.CKF_SERIAL_SESSION);
    try {
      module.pkcs11.C_GenerateRandom(session, Buffer.alloc(8));
    } finally {
      module.pkcs11.C_CloseSession(session);
    }
  } catch (error) {
    throw error instanceof TpmError ? error : toTpmError(error, 'the TPM did not answer');
  } finally {
    releaseModule(module);
  }
}

/**
 * Opens (or creates) a token and logs in as the user. One handle per token and process: a second
 * C_Login on a token already logged in succeeds without checking the PIN, so it is refused here.
 */
export function openToken(options: OpenTokenOptions): TpmToken {
  checkLabel('token', options.tokenLabel);
  checkPin('user', options.userPin);
  if (options.soPin !== undefined) checkPin('SO', options.soPin);
  const modulePath = options.modulePath ?? DEFAULT_TPM2_PKCS11_MODULE;
  for (const token of openTokens) {
    if (token.modulePath === modulePath && token.label === options.tokenLabel) {
      throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `TPM token "${options.tokenLabel}" is already open in this process; reuse that handle`);
    }
  }
  const module = acquireModule(modulePath, options);
  const context = `TPM token "${options.tokenLabel}"`;
  let session: Handle | undefined;
  try {
    const { pkcs11 } = module;
    let match = findSlot(pkcs11, options.tokenLabel);
    let created = false;
    if (!match) {
      if (!options.createIfMissing || options.soPin === undefined) {
        throw new TpmError('ERR_TPM_TOKEN_NOT_FOUND', `${context} not found${options.createIfMissing ? ' and no SO PIN was given to create it' : ''}`);
      }
      const empty = findEmptySlot(pkcs11);
      if (!empty) throw new TpmError('ERR_TPM', `${context}: no uninitialised slot left to create it in`);
      try {
        pkcs11.C_InitToken(empty, options.soPin, paddedLabel(options.tokenLabel));
      } catch (error) {
        throw toTpmError(error, `${context}: creating the token`);
      }
      match = findSlot(pkcs11, options.tokenLabel);
      if (!match) throw new TpmError('ERR_TPM', `${context}: created but not listed afterwards`);
      created = true;
    }
    try {
      session = pkcs11.C_OpenSession(match.slot, pkcs11js.CKF_RW_SESSION | pkcs11js.CKF_SERIAL_SESSION);
    } catch (error) {
      throw toTpmError(error, `${context}: opening a session`);
    }
    const needsUserPin = created || !(match.flags & pkcs11js.CKF_USER_PIN_INITIALIZED);
    if (needsUserPin && options.createIfMissing && options.soPin !== undefined) {
      try {
        pkcs11.C_Login(session, pkcs11js.CKU_SO, options.soPin);
        pkcs11.C_InitPIN(session, options.userPin);
        pkcs11.C_Logout(session);
      } catch (error) {
        throw toTpmError(error, `${context}: setting the user PIN as SO`);
      }
    }
    try {
      pkcs11.C_Login(session, pkcs11js.CKU_USER, options.userPin);
    } catch (error) {
      // Someone else in this process (the OpenSSL engine) is logged in already: the session is usable.
      if (pkcs11ReturnValue(error) !== 'CKR_USER_ALREADY_LOGGED_IN') throw toTpmError(error, `${context}: logging in as user`);
    }
    const token = new TpmToken(module, modulePath, options.tokenLabel, session, created);
    openTokens.add(token);
    installExitHook();
    return token;
  } catch (error) {
    if (session !== undefined) {
      try {
        module.pkcs11.C_CloseSession(session);
      } catch {
        // the original error is the one worth reporting
      }
    }
    releaseModule(module);
    throw error;
  }
}

/** CK_ULONG attributes come back in host byte order and width (8 bytes on 64-bit Linux). */
function ulong(value: Buffer | undefined): number | undefined {
  if (!value) return undefined;
  if (value.length === 8) return Number(value.readBigUInt64LE());
  if (value.length === 4) return value.readUInt32LE();
  return undefined;
}

function ecPointFromAttribute(value: Buffer, context: string): Buffer {
  // PKCS#11 says CKA_EC_POINT is DER OCTET STRING(04‖X‖Y); a few modules return the bare point.
  if (value.length === 67 && value[0] === 0x04 && value[1] === 0x41) return value.subarray(2);
  if (value.length === 65 && value[0] === 0x04) return value;
  throw new TpmError('ERR_TPM_KEY_UNSUPPORTED', `${context}: CKA_EC_POINT is not an uncompressed P-256 point`);
}

export class TpmToken {
  readonly label: string;
  readonly modulePath: string;
  /** True when this open created the token. */
  readonly created: boolean;
  #module: LoadedModule;
  #session: Handle;
  #closed = false;

  /** @internal use openToken() */
  constructor(module: LoadedModule, modulePath: string, label: string, session: Handle, created: boolean) {
    this.#module = module;
    this.modulePath = modulePath;
    this.label = label;
    this.#session = session;
    this.created = created;
  }

  get closed(): boolean {
    return this.#closed;
  }

  #pkcs11(): PKCS11 {
    if (this.#closed) throw new TpmError('ERR_TPM_CLOSED', `TPM token "${this.label}" is closed`);
    return this.#module.pkcs11;
  }

  #context(keyLabel?: string): string {
    return keyLabel === undefined ? `TPM token "${this.label}"` : `TPM token "${this.label}", key "${keyLabel}"`;
  }

  #findObjects(template: Template, max: number): Handle[] {
    const pkcs11 = this.#pkcs11();
    pkcs11.C_FindObjectsInit(this.#session, template);
    try {
      return pkcs11.C_FindObjects(this.#session, max);
    } finally {
      pkcs11.C_FindObjectsFinal(this.#session);
    }
  }

  #findPrivateKeys(label: string): Handle[] {
    return this.#findObjects([
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY },
      { type: pkcs11js.CKA_LABEL, value: label },
    ], 2);
  }

  #keyFromPrivateHandle(label: string, privateHandle: Handle): TpmKey {
    const pkcs11 = this.#pkcs11();
    const context = this.#context(label);
    const [keyType, params, id] = pkcs11.C_GetAttributeValue(this.#session, privateHandle, [
      { type: pkcs11js.CKA_KEY_TYPE },
      { type: pkcs11js.CKA_EC_PARAMS },
      { type: pkcs11js.CKA_ID },
    ]);
    if (ulong(keyType?.value) !== pkcs11js.CKK_EC || !params?.value.equals(P256_EC_PARAMS)) {
      throw new TpmError('ERR_TPM_KEY_UNSUPPORTED', `${context} is not an ECDSA P-256 key`);
    }
    const keyId = Buffer.from(id?.value ?? Buffer.alloc(0));
    // The public object carries CKA_EC_POINT by definition; tpm2-pkcs11 also puts it on the private one.
    const [publicHandle] = this.#findObjects([
      { type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PUBLIC_KEY },
      { type: pkcs11js.CKA_LABEL, value: label },
      ...(keyId.length > 0 ? [{ type: pkcs11js.CKA_ID, value: keyId }] : []),
    ], 1);
    const [point] = pkcs11.C_GetAttributeValue(this.#session, publicHandle ?? privateHandle, [{ type: pkcs11js.CKA_EC_POINT }]);
    if (!point) throw new TpmError('ERR_TPM_KEY_UNSUPPORTED', `${context}: no CKA_EC_POINT`);
    let spki: Buffer;
    try {
      spki = p256SpkiFromPoint(ecPointFromAttribute(point.value, context));
    } catch (error) {
      throw toTpmError(error, context, 'ERR_TPM_KEY_UNSUPPORTED');
    }
    return new TpmKey(this, label, keyId, privateHandle, spki);
  }

  /** Finds the P-256 key pair whose private object has this CKA_LABEL; ERR_TPM_KEY_NOT_FOUND if none. */
  findKey(label: string): TpmKey {
    const key = this.findKeyOrUndefined(label);
    if (!key) throw new TpmError('ERR_TPM_KEY_NOT_FOUND', `${this.#context(label)} not found`);
    return key;
  }

  findKeyOrUndefined(label: string): TpmKey | undefined {
    checkLabel('key', label);
    try {
      const handles = this.#findPrivateKeys(label);
      if (handles.length > 1) throw new TpmError('ERR_TPM_KEY_AMBIGUOUS', `${this.#context(label)}: more than one private key has this label`);
      const [handle] = handles;
      return handle === undefined ? undefined : this.#keyFromPrivateHandle(label, handle);
    } catch (error) {
      throw toTpmError(error, `${this.#context(label)}: looking up the key`);
    }
  }

  /** Generates a P-256 key pair inside the TPM; the private key is never extractable. */
  generateP256Key(label: string): TpmKey {
    checkLabel('key', label);
    const context = this.#context(label);
    try {
      // Labels name keys in the registry CLI and in libp11 URIs: a duplicate would make both ambiguous.
      if (this.#findPrivateKeys(label).length > 0) throw new TpmError('ERR_TPM_KEY_EXISTS', `${context} already exists`);
      const id = randomBytes(16);
      const common: Template = [
        { type: pkcs11js.CKA_TOKEN, value: true },
        { type: pkcs11js.CKA_LABEL, value: label },
        { type: pkcs11js.CKA_ID, value: id },
      ];
      const { privateKey } = this.#pkcs11().C_GenerateKeyPair(
        this.#session,
        { mechanism: pkcs11js.CKM_EC_KEY_PAIR_GEN },
        [...common, { type: pkcs11js.CKA_EC_PARAMS, value: P256_EC_PARAMS }, { type: pkcs11js.CKA_VERIFY, value: true }],
        [
          ...common,
          { type: pkcs11js.CKA_PRIVATE, value: true },
          { type: pkcs11js.CKA_SENSITIVE, value: true },
          { type: pkcs11js.CKA_EXTRACTABLE, value: false },
          { type: pkcs11js.CKA_SIGN, value: true },
        ],
      );
      return this.#keyFromPrivateHandle(label, privateKey);
    } catch (error) {
      throw toTpmError(error, `${context}: generating a P-256 key`);
    }
  }

  findOrCreateP256Key(label: string): TpmKey {
    return this.findKeyOrUndefined(label) ?? this.generateP256Key(label);
  }

  publicKeySpkiDer(key: TpmKey): Buffer {
    this.#own(key);
    return Buffer.from(key.publicKeySpkiDer);
  }

  /** Reads raw attributes of the private key object (tests and diagnostics; sensitive ones fail). */
  privateKeyAttributes(key: TpmKey, types: readonly number[]): Map<number, Buffer> {
    this.#own(key);
    try {
      const result = this.#pkcs11().C_GetAttributeValue(this.#session, key.privateHandle, types.map((type) => ({ type })));
      return new Map(result.map((attribute) => [attribute.type, attribute.value]));
    } catch (error) {
      throw toTpmError(error, `${this.#context(key.label)}: reading attributes`);
    }
  }

  /** ECDSA over a SHA-256 digest computed elsewhere; returns the DER ECDSA-Sig-Value. */
  signDigest(key: TpmKey, sha256Digest: Uint8Array): Buffer {
    this.#own(key);
    if (sha256Digest.length !== SHA256_BYTES) throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `digest must be ${SHA256_BYTES} bytes (SHA-256)`);
    const pkcs11 = this.#pkcs11();
    let raw: Buffer;
    try {
      pkcs11.C_SignInit(this.#session, { mechanism: pkcs11js.CKM_ECDSA }, key.privateHandle);
      raw = pkcs11.C_Sign(this.#session, Buffer.from(sha256Digest), Buffer.alloc(2 * 64));
    } catch (error) {
      throw toTpmError(error, `${this.#context(key.label)}: signing`);
    }
    try {
      return rawSignatureToDer(raw);
    } catch (error) {
      throw toTpmError(error, `${this.#context(key.label)}: the module returned a malformed signature`);
    }
  }

  /** ECDSA P-256 with SHA-256 over `message` (the registry's `ecdsa-p256-sha256`); DER signature. */
  sign(key: TpmKey, message: Uint8Array): Buffer {
    return this.signDigest(key, createHash('sha256').update(message).digest());
  }

  /** The registry's signer interface over this key; `keyId` is the registry key_id (default: the label). */
  permissionSigner(key: TpmKey, keyId: string = key.label): PermissionSigner {
    this.#own(key);
    return {
      keyId,
      publicKeySpkiDer: Buffer.from(key.publicKeySpkiDer),
      sign: async (message) => this.sign(key, message),
    };
  }

  #own(key: TpmKey): void {
    if (key.token !== this) throw new TpmError('ERR_TPM_INVALID_ARGUMENT', `key "${key.label}" belongs to another token handle`);
  }

  /** Logs out, closes the session and finalises the module when no other handle uses it. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    openTokens.delete(this);
    const { pkcs11, ownsInitialize } = this.#module;
    // Logging out would also log out the OpenSSL engine if it shares the module in this process.
    if (ownsInitialize) {
      try {
        pkcs11.C_Logout(this.#session);
      } catch {
        // not logged in, or the TPM is gone: closing the session below is what matters
      }
    }
    try {
      pkcs11.C_CloseSession(this.#session);
    } catch {
      // the session died with the TPM connection; finalising still releases the rest
    }
    releaseModule(this.#module);
  }
}
