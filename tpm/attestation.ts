/**
 * The TPM side of attestation at enrolment (DESIGN §9e), through tpm2-tools subprocesses: npm has no
 * tpm2-tss binding, and this runs at enrolment only (the gateway never touches a TPM).
 *
 * Commands, in order (TCTI from TPM2TOOLS_TCTI, else TPM2_PKCS11_TCTI):
 *   tpm2_nvread 0x01c00002                          RSA EK certificate (swtpm_setup --create-ek-cert)
 *   tpm2_createek -G rsa                            the EK from the default template (same key as the certificate)
 *   tpm2_createak -G ecc -g sha256 -s ecdsa         a restricted signing AK under the EK
 *   tpm2_ptool export                               the tpm2-pkcs11 key's public/private blobs, parent and auth
 *   tpm2_load + tpm2_certify                        the AK certifies the enrolled key
 *   tpm2_makecredential -T none                     the verifier's challenge (no TPM needed)
 *   tpm2_startauthsession/policysecret + tpm2_activatecredential   the TPM answers it
 *
 * Secrets never reach an argument vector except the token user PIN that `tpm2_ptool export` takes
 * as --userpin (for the second it runs); the object's auth value goes through a 0600 file.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AgentGatewayError } from '../core/errors.js';
import { TpmError } from './errors.js';

/** NV index of the RSA 2048 EK certificate (TCG EK Credential Profile). */
export const RSA_EK_CERT_NV_INDEX = '0x01c00002';
const STEP_TIMEOUT_MS = 30_000;

export interface TpmSideEvidence {
  readonly ekCertificate: Buffer;
  readonly akPublic: Buffer;
  readonly akName: Buffer;
  readonly keyPublic: Buffer;
  readonly certifyInfo: Buffer;
  readonly certifySignature: Buffer;
}

export interface AttestorOptions {
  /** The tpm2-pkcs11 key to certify; needed by collect() only. */
  readonly key?: { readonly tokenLabel: string; readonly keyLabel: string; readonly userPin: string };
  /** Environment for the tools: TPM2TOOLS_TCTI or TPM2_PKCS11_TCTI, TPM2_PKCS11_STORE, DBUS_SESSION_BUS_ADDRESS. */
  readonly env: NodeJS.ProcessEnv;
  /**
   * Where the EK and AK contexts live between collect() and activate(). A private temp dir by
   * default (removed by close()); a directory given here is kept, so a later process can answer
   * the verifier's challenge with the same AK (TPM context blobs stay loadable until the TPM resets).
   */
  readonly stateDir?: string;
}

function toolEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const tcti = env.TPM2TOOLS_TCTI ?? env.TPM2_PKCS11_TCTI;
  return { ...env, ...(tcti ? { TPM2TOOLS_TCTI: tcti } : {}), TSS2_LOG: env.TSS2_LOG ?? 'all+NONE' };
}

function runTool(file: string, args: readonly string[], env: NodeJS.ProcessEnv, what: string, secrets: readonly string[] = []): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, [...args], { env, timeout: STEP_TIMEOUT_MS, encoding: 'utf8', maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      if (!error) return resolve(stdout);
      // execFile's message repeats the command line (a --userpin included): scrubbed like the tool's output.
      let output = `${stderr}${stdout}`.trim().split('\n').slice(-3).join(' / ') || error.message;
      for (const secret of secrets) if (secret) output = output.split(secret).join('[redacted]');
      const missing = (error as NodeJS.ErrnoException).code === 'ENOENT';
      reject(new TpmError('ERR_TPM_ATTESTATION', missing ? `${what}: ${file} not found (install tpm2-tools / libtpm2-pkcs11-tools)` : `${what} failed (${file}): ${output}`, { cause: error }));
    });
  });
}

/** Reads one DER TLV at `offset`; returns [tag, value start, value end]. */
function tlv(der: Buffer, offset: number): [number, number, number] {
  if (offset + 2 > der.length) throw new Error('truncated DER');
  const tag = der[offset]!;
  let length = der[offset + 1]!;
  let start = offset + 2;
  if (length & 0x80) {
    const count = length & 0x7f;
    if (count === 0 || count > 4 || start + count > der.length) throw new Error('bad DER length');
    length = 0;
    for (let i = 0; i < count; i++) length = length * 256 + der[start + i]!;
    start += count;
  }
  if (start + length > der.length) throw new Error('truncated DER');
  return [tag, start, start + length];
}

/**
 * The certificate inside an NV index's contents: on hardware TPMs the index may be larger than the
 * certificate (padding after the DER), so keep exactly the outer SEQUENCE.
 */
export function certificateDer(nv: Buffer): Buffer {
  try {
    const [tag, , end] = tlv(nv, 0);
    if (tag === 0x30) return nv.subarray(0, end);
  } catch {
    // not DER: the verifier says so with the whole contents in hand
  }
  return nv;
}

/** The parent handle and blobs of a `TSS2 PRIVATE KEY` PEM (the TPM 2.0 key file format tpm2_ptool export writes). */
export function parseTss2PrivateKey(pem: string): { parent: number; publicBlob: Buffer; privateBlob: Buffer } {
  const body = /-----BEGIN TSS2 PRIVATE KEY-----([\s\S]+?)-----END TSS2 PRIVATE KEY-----/.exec(pem)?.[1];
  if (!body) throw new TpmError('ERR_TPM_ATTESTATION', 'tpm2_ptool export wrote no TSS2 PRIVATE KEY');
  const der = Buffer.from(body.replace(/\s+/g, ''), 'base64');
  const fields: [number, Buffer][] = [];
  try {
    const [, seqStart, seqEnd] = tlv(der, 0);
    for (let offset = seqStart; offset < seqEnd;) {
      const [tag, start, end] = tlv(der, offset);
      fields.push([tag, der.subarray(start, end)]);
      offset = end;
    }
  } catch (error) {
    throw new TpmError('ERR_TPM_ATTESTATION', `tpm2_ptool export wrote a malformed TSS2 PRIVATE KEY: ${(error as Error).message}`, { cause: error });
  }
  const integers = fields.filter(([tag]) => tag === 0x02).map(([, value]) => value);
  const octets = fields.filter(([tag]) => tag === 0x04).map(([, value]) => value);
  if (integers.length !== 1 || integers[0]!.length === 0 || integers[0]!.length > 5 || octets.length !== 2) throw new TpmError('ERR_TPM_ATTESTATION', 'unexpected TSS2 PRIVATE KEY layout');
  const parent = Number(BigInt(`0x${integers[0]!.toString('hex')}`) & 0xffffffffn);
  return { parent, publicBlob: Buffer.from(octets[0]!), privateBlob: Buffer.from(octets[1]!) };
}

/**
 * One enrolment's TPM session: collect() creates the EK/AK contexts in a private temp dir and
 * certifies the key; activate() answers the verifier's credential with that same AK. close() always.
 */
export class TpmAttestor {
  readonly #options: AttestorOptions;
  readonly #env: NodeJS.ProcessEnv;
  readonly #dir: string;
  readonly #ownsDir: boolean;

  constructor(options: AttestorOptions) {
    this.#options = options;
    this.#env = toolEnv(options.env);
    this.#ownsDir = options.stateDir === undefined;
    if (options.stateDir === undefined) {
      this.#dir = mkdtempSync(join(tmpdir(), 'agw-attest-'));
    } else {
      mkdirSync(options.stateDir, { recursive: true, mode: 0o700 });
      // A directory that already existed is the caller's, perhaps shared (/tmp): refuse it when
      // others may look in, rather than change its mode.
      const mode = statSync(options.stateDir).mode & 0o777;
      if ((mode & 0o077) !== 0) {
        throw new AgentGatewayError('ERR_USAGE', `--state-dir ${options.stateDir} is open to other users (mode ${mode.toString(8).padStart(4, '0')}): it holds the attestation key's context and, for a moment, the activated secret; give a directory of its own with mode 0700`);
      }
      this.#dir = options.stateDir;
    }
  }

  #path(name: string): string {
    return join(this.#dir, name);
  }

  async collect(): Promise<TpmSideEvidence> {
    const env = this.#env;
    if (!this.#options.key) throw new TpmError('ERR_TPM_INVALID_ARGUMENT', 'collecting evidence needs the token, key label and user PIN');
    const { tokenLabel, keyLabel, userPin } = this.#options.key;
    await runTool('tpm2_nvread', [RSA_EK_CERT_NV_INDEX, '-o', this.#path('ek.der')], env, `reading the EK certificate at NV ${RSA_EK_CERT_NV_INDEX}`);
    await runTool('tpm2_createek', ['-c', this.#path('ek.ctx'), '-G', 'rsa', '-u', this.#path('ek.pub')], env, 'creating the EK');
    await runTool('tpm2_createak', ['-C', this.#path('ek.ctx'), '-c', this.#path('ak.ctx'), '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', this.#path('ak.pub'), '-n', this.#path('ak.name')], env, 'creating the attestation key');
    const store = env.TPM2_PKCS11_STORE;
    const exported = await runTool('tpm2_ptool', ['export', '--label', tokenLabel, '--key-label', keyLabel, '--userpin', userPin, '--output-prefix', this.#path('key'), ...(store ? ['--path', store] : [])], env, `exporting the blobs of key "${keyLabel}" in token "${tokenLabel}"`, [userPin]);
    const auth = /^object-auth:\s*(\S+)\s*$/m.exec(exported)?.[1];
    if (!auth) throw new TpmError('ERR_TPM_ATTESTATION', `tpm2_ptool export printed no object auth for key "${keyLabel}"`);
    const key = parseTss2PrivateKey(readFileSync(this.#path('key.pem'), 'utf8'));
    if (key.parent >>> 24 !== 0x81) {
      throw new TpmError('ERR_TPM_ATTESTATION', `the token's primary key is not persistent (parent 0x${key.parent.toString(16)}): create the token with a persistent primary (tpm2_ptool init)`);
    }
    writeFileSync(this.#path('key.pub'), key.publicBlob);
    writeFileSync(this.#path('key.priv'), key.privateBlob);
    writeFileSync(this.#path('key.auth'), auth, { mode: 0o600 });
    try {
      await this.#certify(key.parent, env);
    } finally {
      // The object's auth value must not outlive the certification in a kept state dir.
      rmSync(this.#path('key.auth'), { force: true });
      rmSync(this.#path('key.pem'), { force: true });
      rmSync(this.#path('key.priv'), { force: true });
    }
    return {
      ekCertificate: certificateDer(readFileSync(this.#path('ek.der'))),
      akPublic: readFileSync(this.#path('ak.pub')),
      akName: readFileSync(this.#path('ak.name')),
      keyPublic: key.publicBlob,
      certifyInfo: readFileSync(this.#path('attest')),
      certifySignature: readFileSync(this.#path('signature')),
    };
  }

  async #certify(parent: number, env: NodeJS.ProcessEnv): Promise<void> {
    await runTool('tpm2_load', ['-C', `0x${parent.toString(16)}`, '-u', this.#path('key.pub'), '-r', this.#path('key.priv'), '-c', this.#path('key.ctx')], env, 'loading the key');
    await runTool('tpm2_certify', ['-c', this.#path('key.ctx'), '-P', `file:${this.#path('key.auth')}`, '-C', this.#path('ak.ctx'), '-g', 'sha256', '-o', this.#path('attest'), '-s', this.#path('signature')], env, 'certifying the key with the AK');
    await runTool('tpm2_flushcontext', [this.#path('key.ctx')], env, 'unloading the key').catch(() => undefined);
  }

  /** TPM2_ActivateCredential with the AK from collect() and the EK (policy: endorsement secret). */
  async activate(credential: Buffer): Promise<Buffer> {
    const env = this.#env;
    for (const context of ['ek.ctx', 'ak.ctx']) {
      if (!existsSync(this.#path(context))) throw new TpmError('ERR_TPM_ATTESTATION', `no ${context} in ${this.#dir}: collect the evidence first, with the same state directory`);
    }
    writeFileSync(this.#path('credential'), credential);
    const session = this.#path('session.ctx');
    await runTool('tpm2_startauthsession', ['--policy-session', '-S', session], env, 'starting a policy session');
    try {
      await runTool('tpm2_policysecret', ['-S', session, '-c', 'e'], env, 'satisfying the EK policy');
      await runTool('tpm2_activatecredential', ['-c', this.#path('ak.ctx'), '-C', this.#path('ek.ctx'), '-i', this.#path('credential'), '-o', this.#path('secret'), '-P', `session:${session}`], env, 'activating the credential');
    } finally {
      await runTool('tpm2_flushcontext', [session], env, 'closing the policy session').catch(() => undefined);
    }
    try {
      return readFileSync(this.#path('secret'));
    } finally {
      rmSync(this.#path('secret'), { force: true });
    }
  }

  close(): void {
    if (this.#ownsDir) rmSync(this.#dir, { recursive: true, force: true });
  }
}

/**
 * The verifier's challenge: a credential only the TPM holding `ekPublicPem` can open, and only for
 * the object named `akName`. `tpm2_makecredential -T none` needs no TPM.
 */
export async function makeCredential(ekPublicPem: string, akName: Buffer, secret: Buffer, env: NodeJS.ProcessEnv = process.env): Promise<Buffer> {
  const dir = mkdtempSync(join(tmpdir(), 'agw-credential-'));
  try {
    writeFileSync(join(dir, 'ek.pem'), ekPublicPem);
    writeFileSync(join(dir, 'secret'), secret, { mode: 0o600 });
    await runTool('tpm2_makecredential', ['-T', 'none', '-u', join(dir, 'ek.pem'), '-G', 'rsa', '-s', join(dir, 'secret'), '-n', akName.toString('hex'), '-o', join(dir, 'credential')], { ...env, TSS2_LOG: 'all+NONE' }, 'making the credential');
    return readFileSync(join(dir, 'credential'));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
