/**
 * The coordinator's store port. LevelDB implements it today (level.ts); a distributed store (etcd) is
 * meant to sit behind the same interface later, for coordinators in high availability.
 *
 * The model is a sorted key-value space with JSON values and serialised read-modify-write
 * transactions: everything a transaction writes lands in one atomic batch, or nothing does. Every value
 * is stored in a versioned envelope (`{"v": <schema>, "d": <value>}`) so the format of a record type can
 * evolve: a reader registered for a key prefix upgrades old versions as it reads them (see `Schema`).
 * Key layout: keys.ts.
 */

/** A JSON value as the store keeps it (no bigint: store uint64 figures as decimal strings). */
export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [k: string]: JsonValue | undefined };

/** A read view: the committed state, plus (inside a transaction) the transaction's own writes. */
export interface StoreReader {
  /** The value at `key`, or undefined. */
  get<T extends JsonValue = JsonValue>(key: string): Promise<T | undefined>;
  /**
   * Entries whose key starts with `prefix`, in key order (reverse order with `reverse`), starting after
   * `after` when given, at most `limit`.
   */
  list<T extends JsonValue = JsonValue>(
    prefix: string,
    opts?: { after?: string; limit?: number; reverse?: boolean },
  ): Promise<Array<[key: string, value: T]>>;
}

/** A transaction: reads see its own writes; writes are committed together when the function returns. */
export interface Txn extends StoreReader {
  put(key: string, value: JsonValue): void;
  del(key: string): void;
  /** Runs after a successful commit (e.g. to notify watchers of what was written). */
  afterCommit(fn: () => void): void;
}

export interface Store extends StoreReader {
  /**
   * Runs `fn` as a serialised transaction: no other transaction runs between its reads and its commit,
   * and all its writes land in one atomic batch. When `fn` throws, nothing is written.
   */
  transact<R>(fn: (tx: Txn) => Promise<R>): Promise<R>;
  close(): Promise<void>;
}

/** Upgrades one record type's stored versions to the current one. */
export interface Schema {
  /** Key prefix of the record type, e.g. "node/". */
  prefix: string;
  /** The version new writes carry. */
  current: number;
  /** Turns a value of an older version into the current shape. */
  upgrade?(version: number, value: JsonValue): JsonValue;
}
