import { Envelopes } from "./envelope.js";
import type { JsonValue, Schema, Store, StoreReader, Txn } from "./store.js";

/** What a concrete store gives the shared transaction logic: raw string reads and one atomic batch. */
export interface RawStore {
  getRaw(key: string): Promise<string | undefined>;
  listRaw(
    prefix: string,
    opts: { after?: string; limit?: number; reverse?: boolean },
  ): Promise<Array<[string, string]>>;
  /** Applies every write atomically; a value of undefined deletes the key. */
  commitRaw(writes: Map<string, string | undefined>): Promise<void>;
  closeRaw(): Promise<void>;
}

/** The part of every Store that is not storage: envelopes, serialised transactions, read-your-writes. */
export class BaseStore implements Store {
  readonly #raw: RawStore;
  readonly #env: Envelopes;
  #tail: Promise<unknown> = Promise.resolve();
  #closed = false;

  constructor(raw: RawStore, schemas: Schema[] = []) {
    this.#raw = raw;
    this.#env = new Envelopes(schemas);
  }

  async get<T extends JsonValue = JsonValue>(key: string): Promise<T | undefined> {
    const raw = await this.#raw.getRaw(key);
    return raw === undefined ? undefined : (this.#env.decode(key, raw) as T);
  }

  async list<T extends JsonValue = JsonValue>(
    prefix: string,
    opts: { after?: string; limit?: number; reverse?: boolean } = {},
  ): Promise<Array<[string, T]>> {
    const rows = await this.#raw.listRaw(prefix, opts);
    return rows.map(([k, v]) => [k, this.#env.decode(k, v) as T]);
  }

  transact<R>(fn: (tx: Txn) => Promise<R>): Promise<R> {
    if (this.#closed) return Promise.reject(new Error("store is closed"));
    const run = this.#tail.then(() => this.#run(fn));
    this.#tail = run.catch(() => undefined);
    return run;
  }

  async #run<R>(fn: (tx: Txn) => Promise<R>): Promise<R> {
    const writes = new Map<string, JsonValue | undefined>();
    const after: Array<() => void> = [];
    const outer: StoreReader = this;
    const tx: Txn = {
      async get<T extends JsonValue = JsonValue>(key: string): Promise<T | undefined> {
        if (writes.has(key)) return writes.get(key) as T | undefined;
        return outer.get<T>(key);
      },
      async list<T extends JsonValue = JsonValue>(
        prefix: string,
        opts: { after?: string; limit?: number; reverse?: boolean } = {},
      ): Promise<Array<[string, T]>> {
        // Merge committed rows with this transaction's own writes under the prefix.
        const merged = new Map<string, T>();
        for (const [k, v] of await outer.list<T>(prefix, { after: opts.after, reverse: opts.reverse }))
          merged.set(k, v);
        for (const [k, v] of writes) {
          if (!k.startsWith(prefix)) continue;
          if (opts.after !== undefined && (opts.reverse ? k >= opts.after : k <= opts.after)) continue;
          if (v === undefined) merged.delete(k);
          else merged.set(k, v as T);
        }
        const keys = [...merged.keys()].sort();
        if (opts.reverse) keys.reverse();
        const limited = opts.limit === undefined ? keys : keys.slice(0, opts.limit);
        return limited.map((k) => [k, merged.get(k) as T]);
      },
      put(key: string, value: JsonValue): void {
        writes.set(key, structuredClone(value));
      },
      del(key: string): void {
        writes.set(key, undefined);
      },
      afterCommit(f: () => void): void {
        after.push(f);
      },
    };
    const result = await fn(tx);
    if (writes.size > 0) {
      const raw = new Map<string, string | undefined>();
      for (const [k, v] of writes) raw.set(k, v === undefined ? undefined : this.#env.encode(k, v));
      await this.#raw.commitRaw(raw);
    }
    for (const f of after) f();
    return result;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#tail;
    await this.#raw.closeRaw();
  }
}
