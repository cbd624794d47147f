/**
 * Where an item keeps its position in one bag: a number field of its own, -1 (or absent) when it
 * is not in the bag. An item may be in several bags, each with its own field.
 */
export interface BagSlot<T> {
  get(item: T): number | undefined;
  set(item: T, position: number): void;
}

/**
 * An unordered set of objects that come and go at the CONNECT rate: an array with swap-remove,
 * each item holding its own position.
 *
 * Why not a Set or a Map: when V8 rehashes one, the old backing store keeps its entries and a
 * pointer to the new one (for iterators still walking it). Once one store has been promoted to the
 * old generation, every scavenge keeps its successor alive through that pointer, and the successor
 * its own, so every member ever added, with everything it reaches, is promoted in turn. Measured
 * (2026-11-30, bench/compare.ts --phases connect): with the open tunnels and CONNECT handlers in
 * Sets, ~3.5 KB of each CONNECT was promoted and scavenges took 5 ms on average; a Set churned
 * with 32 members promoted 815 MB against 50 MB for the same objects held in an array. An array
 * clears a removed item's slot and its backing store never points at its successor.
 */
export class Bag<T> implements Iterable<T> {
  readonly #items: T[] = [];
  readonly #slot: BagSlot<T>;

  constructor(slot: BagSlot<T>) {
    this.#slot = slot;
  }

  get size(): number {
    return this.#items.length;
  }

  /** Adds `item`; false when it is in already. */
  add(item: T): boolean {
    if (this.has(item)) return false;
    this.#slot.set(item, this.#items.length);
    this.#items.push(item);
    return true;
  }

  has(item: T): boolean {
    const position = this.#slot.get(item);
    return position !== undefined && position >= 0 && this.#items[position] === item;
  }

  /** Removes `item`; false when it was not in. */
  delete(item: T): boolean {
    if (!this.has(item)) return false;
    const position = this.#slot.get(item)!;
    const last = this.#items.pop()!;
    if (last !== item) {
      this.#items[position] = last;
      this.#slot.set(last, position);
    }
    this.#slot.set(item, -1);
    return true;
  }

  /** Any one member, or undefined when empty. */
  any(): T | undefined {
    return this.#items[0];
  }

  /** The members at this moment: adding or removing while walking them changes nothing in the walk. */
  [Symbol.iterator](): IterableIterator<T> {
    return this.#items.slice().values();
  }
}
