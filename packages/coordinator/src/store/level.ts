import { Level } from "level";
import { BaseStore, type RawStore } from "./base.js";
import type { Schema } from "./store.js";

/** The store on LevelDB (`level`): one directory, opened by one coordinator at a time (LevelDB's lock). */
export async function openLevelStore(dir: string, schemas: Schema[] = []): Promise<BaseStore> {
  const db = new Level<string, string>(dir, { keyEncoding: "utf8", valueEncoding: "utf8" });
  await db.open();
  const raw: RawStore = {
    getRaw: (key) => db.get(key),
    async listRaw(prefix, opts) {
      const range: {
        gt?: string;
        gte?: string;
        lt?: string;
        lte?: string;
        limit?: number;
        reverse?: boolean;
      } = {
        reverse: opts.reverse ?? false,
        limit: opts.limit ?? -1,
      };
      // Everything starting with the prefix is below prefix + U+FFFF.
      const end = `${prefix}\uffff`;
      if (opts.reverse) {
        range.gte = prefix;
        if (opts.after !== undefined) range.lt = opts.after;
        else range.lte = end;
      } else {
        range.lt = end;
        if (opts.after !== undefined) range.gt = opts.after;
        else range.gte = prefix;
      }
      return db.iterator(range).all();
    },
    async commitRaw(writes) {
      const ops = [...writes].map(([key, value]) =>
        value === undefined ? { type: "del" as const, key } : { type: "put" as const, key, value },
      );
      await db.batch(ops, { sync: true });
    },
    closeRaw: () => db.close(),
  };
  return new BaseStore(raw, schemas);
}
