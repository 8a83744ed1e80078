import { BaseStore, type RawStore } from "./base.js";
import type { Schema } from "./store.js";

/** The store in memory, for unit tests: the same transactions and envelopes as the LevelDB one. */
export function memoryStore(schemas: Schema[] = []): BaseStore {
  const data = new Map<string, string>();
  const raw: RawStore = {
    async getRaw(key) {
      return data.get(key);
    },
    async listRaw(prefix, opts) {
      let keys = [...data.keys()].filter((k) => k.startsWith(prefix)).sort();
      if (opts.reverse) keys.reverse();
      if (opts.after !== undefined) {
        const after = opts.after;
        keys = keys.filter((k) => (opts.reverse ? k < after : k > after));
      }
      if (opts.limit !== undefined) keys = keys.slice(0, opts.limit);
      return keys.map((k) => [k, data.get(k) as string]);
    },
    async commitRaw(writes) {
      for (const [k, v] of writes) {
        if (v === undefined) data.delete(k);
        else data.set(k, v);
      }
    },
    async closeRaw() {},
  };
  return new BaseStore(raw, schemas);
}
