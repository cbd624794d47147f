/**
 * Where Debian puts the native libraries the TPM path loads. Both are overridable by flags
 * (--pkcs11-module, --pkcs11-engine) and environment variables for other layouts.
 */
const MULTIARCH: Readonly<Record<string, string>> = { x64: 'x86_64-linux-gnu', arm64: 'aarch64-linux-gnu' };
const LIB = `/usr/lib/${MULTIARCH[process.arch] ?? 'x86_64-linux-gnu'}`;

/** Debian's libtpm2-pkcs11-1: the PKCS#11 module over the TPM. */
export const DEFAULT_TPM2_PKCS11_MODULE = `${LIB}/pkcs11/libtpm2_pkcs11.so`;
/** Debian's libengine-pkcs11-openssl (libp11) for OpenSSL 3. */
export const DEFAULT_PKCS11_ENGINE = `${LIB}/engines-3/pkcs11.so`;
