/**
 * Client bytes kept for a while (before a CONNECT's answer, during the SNI check), copied into
 * one buffer of their own. Keeping the chunks Node hands over would keep much more: each is a
 * slice of a whole TLS read (a 1-byte DATA frame padded in its read by an ignored 16 KiB frame
 * kept ~16 KiB per byte in a review), and each costs a Buffer object (~126 heap bytes per byte
 * for 1-byte frames). The buffer grows by doubling, from 1 KiB up to `max`; its capacity, not
 * the payload, is what it costs.
 */
export class ByteHold {
  static readonly MIN_CAPACITY = 1024;
  readonly max: number;
  #buffer: Buffer | undefined;
  #size = 0;

  constructor(max: number) {
    this.max = max;
  }

  get size(): number {
    return this.#size;
  }

  /** Bytes allocated now. */
  get capacity(): number {
    return this.#buffer?.length ?? 0;
  }

  /** The capacity holding `more` bytes would take, or undefined past `max`. */
  capacityFor(more: number): number | undefined {
    const needed = this.#size + more;
    if (needed > this.max) return undefined;
    let capacity = Math.max(this.capacity, ByteHold.MIN_CAPACITY);
    while (capacity < needed) capacity *= 2;
    return Math.min(capacity, Math.max(this.max, ByteHold.MIN_CAPACITY));
  }

  /** Copies `chunk` in; false, keeping nothing of it, when it would go past `max`. */
  append(chunk: Uint8Array): boolean {
    const capacity = this.capacityFor(chunk.length);
    if (capacity === undefined) return false;
    if (capacity !== this.capacity) {
      const grown = Buffer.allocUnsafeSlow(capacity);
      if (this.#buffer) this.#buffer.copy(grown, 0, 0, this.#size);
      this.#buffer = grown;
    }
    this.#buffer!.set(chunk, this.#size);
    this.#size += chunk.length;
    return true;
  }

  /** The bytes held (a view, valid until the next append or clear). */
  bytes(): Buffer {
    return this.#buffer ? this.#buffer.subarray(0, this.#size) : Buffer.alloc(0);
  }

  clear(): void {
    this.#buffer = undefined;
    this.#size = 0;
  }
}
