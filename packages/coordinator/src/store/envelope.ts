import type { JsonValue, Schema } from "./store.js";

/** Wraps values in `{"v": version, "d": value}` and upgrades old versions on read. */
export class Envelopes {
  readonly #schemas: Schema[];

  constructor(schemas: Schema[] = []) {
    // Longest prefix first, so "op/req/" wins over "op/".
    this.#schemas = [...schemas].sort((a, b) => b.prefix.length - a.prefix.length);
  }

  #schema(key: string): Schema | undefined {
    return this.#schemas.find((s) => key.startsWith(s.prefix));
  }

  encode(key: string, value: JsonValue): string {
    return JSON.stringify({ v: this.#schema(key)?.current ?? 1, d: value });
  }

  decode(key: string, raw: string): JsonValue {
    const env = JSON.parse(raw) as { v: number; d: JsonValue };
    const schema = this.#schema(key);
    if (!schema || env.v === schema.current) return env.d;
    if (env.v > schema.current)
      throw new Error(
        `record ${key} has format version ${env.v}, newer than this coordinator reads (${schema.current})`,
      );
    if (!schema.upgrade)
      throw new Error(`record ${key} has format version ${env.v} and no upgrade to ${schema.current}`);
    return schema.upgrade(env.v, env.d);
  }
}
