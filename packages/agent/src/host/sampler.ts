/**
 * Reuses the result of an expensive read for `maxAgeMs`, and lets concurrent callers share one read in
 * flight. A failed read is not kept: the next caller tries again.
 */
export class Sampler<T> {
  #value: { at: number; value: T } | undefined;
  #inFlight: Promise<{ at: number; value: T }> | undefined;

  constructor(
    private readonly read: () => Promise<T>,
    private readonly maxAgeMs: number,
    private readonly now: () => number,
  ) {}

  /** The latest sample and when it was taken. */
  async get(): Promise<{ at: number; value: T }> {
    const v = this.#value;
    if (v && this.now() - v.at < this.maxAgeMs) return v;
    this.#inFlight ??= this.read()
      .then((value) => (this.#value = { at: this.now(), value }))
      .finally(() => {
        this.#inFlight = undefined;
      });
    return this.#inFlight;
  }
}
