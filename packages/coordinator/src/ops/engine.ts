import { EventEmitter } from "node:events";
import type { Logger } from "@vmenv/rpc";
import { failedPrecondition, invalidArgument, notFound, VmenvError } from "@vmenv/rpc/errors";
import type { Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, Txn } from "../store/store.js";
import { isTransient, toOpError } from "./errors.js";
import type {
  OpError,
  OperationKind,
  OpRecord,
  OpState,
  StepContext,
  StepDef,
  StepRecord,
  StepState,
} from "./types.js";

/** States an operation never leaves. */
export const FINAL_STATES: readonly OpState[] = ["succeeded", "failed", "cancelled"];
export const isFinal = (s: OpState) => s === "succeeded" || s === "failed" || s === "cancelled";

/** How transient step errors (agent unavailable, deadline exceeded) are retried before the step fails. */
export interface RetryOptions {
  /** Retries after the first attempt. */
  attempts: number;
  /** First backoff; doubled on every retry, up to `maxDelayMs`. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** No retry starts later than this after the step's first attempt. */
  totalMs: number;
}

export const DEFAULT_RETRY: RetryOptions = {
  attempts: 5,
  baseDelayMs: 250,
  maxDelayMs: 5000,
  totalMs: 60_000,
};

/** Finished operations kept; older finished ones are pruned. */
export const DEFAULT_KEEP_FINISHED = 10_000;

export interface EngineOptions {
  store: Store;
  clock: Clock;
  logger: Logger;
  /**
   * Crash test hook: at the N-th crash point the engine passes (1-based; 0 or absent: never) it calls
   * `crash` — by default it SIGKILLs its own process. See `CrashPhase`.
   */
  crashPoint?: number;
  /** What reaching `crashPoint` does (tests in one process pass `() => engine.freeze()`). */
  crash?: () => void;
  retry?: Partial<RetryOptions>;
  /** Finished operations kept (default 10 000). */
  keepFinished?: number;
}

/**
 * Where crash points are (each logs `{crashPoint, op, kind, step, phase}` at debug):
 * - `step-started`: the step's RUNNING mark is committed, the step has not run;
 * - `step-ran`: `run()` returned, its completion is not committed;
 * - `step-completed`: the completion (with the step's onComplete writes) is committed;
 * - `undo-started`, `undo-ran`, `undo-completed`: the same three for an undo during rollback.
 */
export type CrashPhase =
  | "step-started"
  | "step-ran"
  | "step-completed"
  | "undo-started"
  | "undo-ran"
  | "undo-completed";

/** Thrown inside the engine when it stops or freezes mid-operation: the operation is left as persisted. */
class Paused extends Error {
  override readonly name = "Paused";
}

/** One operation being driven by this engine. */
interface Runner {
  op: OpRecord;
  kind: OperationKind;
  /** Aborted by stop()/freeze(): steps end, nothing is recorded, the operation resumes at the next start. */
  stop: AbortController;
  /** Aborted by cancel(): the running step ends and the operation rolls back. */
  cancel: AbortController;
}

const CANCEL_REASON = "OPERATION_CANCELLED";

const opName = (id: string) => `operations/${id}`;

/**
 * The coordinator's durable operation engine (seed 001's persisted, resumable command queue).
 *
 * Every operation is written (`op/{id}`, PENDING) before anything happens; its steps (planned by its
 * kind, see types.ts) run one at a time, each step's RUNNING mark committed before it runs and its
 * completion — together with the writes the step registered with `ctx.onComplete` — committed in one
 * transaction after. A failed step rolls the operation back (completed steps undone in reverse). After a
 * crash `resumeAll()` continues every unfinished operation from its first unfinished step. Operations on
 * one environment run one at a time, in creation order (the `lock/{env}` record). Emits `changed` with
 * the operation after every change (committed, or progress in memory).
 */
export class OperationEngine extends EventEmitter<{ changed: [OpRecord] }> {
  readonly #store: Store;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #crashPoint: number;
  readonly #crash: () => void;
  readonly #retry: RetryOptions;
  readonly #keepFinished: number;
  readonly #kinds = new Map<string, OperationKind>();
  /** Operations being driven now, by id. */
  readonly #runners = new Map<string, Runner>();
  /** Drivers in flight (for idle() and stop()). */
  readonly #drivers = new Set<Promise<void>>();
  /** Per environment: PENDING operations waiting for its lock. */
  readonly #waiters = new Map<string, Map<string, () => void>>();
  #points = 0;
  #stopping = false;
  #frozen = false;
  #finishedCount = 0;
  #lastIdMs = 0;
  #idSeq = 0;

  /** Builds an engine on a store; call `register` for each kind, then `resumeAll()`. */
  constructor(opts: EngineOptions) {
    super();
    this.setMaxListeners(0);
    this.#store = opts.store;
    this.#clock = opts.clock;
    this.#log = opts.logger;
    this.#crashPoint = opts.crashPoint ?? 0;
    this.#crash = opts.crash ?? (() => process.kill(process.pid, "SIGKILL"));
    this.#retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.#keepFinished = opts.keepFinished ?? DEFAULT_KEEP_FINISHED;
  }

  /** Makes a kind of operation known (before `resumeAll`, so that its unfinished operations resume). */
  register(kind: OperationKind): void {
    if (this.#kinds.has(kind.kind)) throw new Error(`operation kind ${kind.kind} registered twice`);
    this.#kinds.set(kind.kind, kind);
  }

  /**
   * Persists the operation PENDING (and `opreq/{requestId}`), returns it; it then runs in the
   * background. A repeated requestId returns the first operation. With `wait: false`, a held environment
   * lock fails the call: VmenvError aborted ENVIRONMENT_LOCKED naming the holder.
   */
  async start(
    kind: string,
    target: string,
    input: JsonValue,
    opts: { requestId?: string; parent?: string; wait?: boolean } = {},
  ): Promise<OpRecord> {
    this.#checkRunning();
    const k = this.#kindOf(kind);
    const op = await this.#store.transact(async (tx) => {
      if (opts.requestId) {
        const first = await tx.get<string>(keys.opRequest(opts.requestId));
        if (first !== undefined) {
          const prior = await this.#read(tx, first);
          if (prior) return { prior };
        }
      }
      const rec = this.#newRecord(kind, target, input, opts.requestId, opts.parent);
      rec.lock = k.lock?.(rec);
      let parent: OpRecord | undefined;
      if (opts.parent) {
        parent = await this.#read(tx, opts.parent);
        if (!parent) throw notFound("operation", opName(opts.parent));
        parent.children.push(rec.id);
        parent.updateMs = rec.createMs;
      }
      if (rec.lock) {
        const blocker = await this.#blocker(tx, rec);
        if (blocker && opts.wait === false)
          throw new VmenvError(
            "aborted",
            `environments/${rec.lock} is locked by ${opName(blocker)}; try again when it has finished`,
            {
              reason: "ENVIRONMENT_LOCKED",
              metadata: { environment: `environments/${rec.lock}`, operation: opName(blocker) },
            },
          );
        if (blocker) rec.blockedBy = blocker;
      }
      tx.put(keys.op(rec.id), rec as unknown as JsonValue);
      if (opts.requestId) tx.put(keys.opRequest(opts.requestId), rec.id);
      if (parent) {
        tx.put(keys.op(parent.id), parent as unknown as JsonValue);
        const live = this.#runners.get(parent.id);
        tx.afterCommit(() => {
          if (live) live.op.children = [...parent.children];
        });
      }
      return { created: rec };
    });
    if ("prior" in op && op.prior) return this.#fresh(op.prior);
    const rec = (op as { created: OpRecord }).created;
    this.emit("changed", structuredClone(rec));
    this.#log.info({ op: opName(rec.id), kind, target, requestId: opts.requestId }, "operation accepted");
    this.#schedule(rec);
    return structuredClone(rec);
  }

  /** The operation (with its in-memory progress while it runs); NOT_FOUND OPERATION_NOT_FOUND. */
  async get(id: string): Promise<OpRecord> {
    const live = this.#runners.get(id);
    if (live) return structuredClone(live.op);
    const rec = await this.#store.get<JsonValue>(keys.op(id));
    if (rec === undefined) throw notFound("operation", opName(id));
    return rec as unknown as OpRecord;
  }

  /** Operations matching every given filter, newest first, one page (`next`: token of the next page). */
  async list(f: {
    states?: OpState[];
    kind?: string;
    target?: string;
    parent?: string;
    requestId?: string;
    pageSize: number;
    pageToken: string;
  }): Promise<{ ops: OpRecord[]; next: string }> {
    if (f.pageSize < 0) throw invalidArgument("page_size", "must not be negative");
    const size = f.pageSize > 0 ? Math.min(f.pageSize, 1000) : 100;
    let after: string | undefined;
    if (f.pageToken) {
      after = Buffer.from(f.pageToken, "base64url").toString();
      if (!after.startsWith(keys.opPrefix))
        throw invalidArgument("page_token", "is not a token this list gave");
    }
    const states = f.states && f.states.length > 0 ? new Set(f.states) : undefined;
    const match = (o: OpRecord) =>
      (!states || states.has(o.state)) &&
      (!f.kind || o.kind === f.kind) &&
      (!f.target || o.target === f.target) &&
      (!f.parent || o.parent === f.parent) &&
      (!f.requestId || o.requestId === f.requestId);
    const ops: OpRecord[] = [];
    let lastKey: string | undefined;
    if (f.requestId) {
      const id = await this.#store.get<string>(keys.opRequest(f.requestId));
      const o = id === undefined ? undefined : await this.get(id).catch(() => undefined);
      if (o && match(o) && (after === undefined || keys.op(o.id) < after)) ops.push(o);
      return { ops, next: "" };
    }
    for (;;) {
      const rows = await this.#store.list<JsonValue>(keys.opPrefix, {
        reverse: true,
        limit: 500,
        ...(after !== undefined ? { after } : {}),
      });
      for (const [key, v] of rows) {
        const o = this.#runners.get((v as unknown as OpRecord).id)?.op ?? (v as unknown as OpRecord);
        after = key;
        if (!match(o)) continue;
        if (ops.length === size) return { ops, next: Buffer.from(lastKey as string).toString("base64url") };
        ops.push(structuredClone(o));
        lastKey = key;
      }
      if (rows.length < 500) return { ops, next: "" };
    }
  }

  /**
   * The operation once it has finished, or as it is when `timeoutMs` has passed or `signal` aborts
   * (whichever comes first).
   */
  async wait(id: string, timeoutMs: number, signal?: AbortSignal): Promise<OpRecord> {
    const timeout = AbortSignal.timeout(Math.max(0, timeoutMs));
    const stop = signal ? AbortSignal.any([timeout, signal]) : timeout;
    try {
      return await this.#waitFinal(id, stop);
    } catch (err) {
      if (err instanceof VmenvError) throw err;
      return this.get(id);
    }
  }

  /**
   * Asks an operation to stop: a PENDING one ends CANCELLED at once; a RUNNING one has its running
   * step's signal aborted, then rolls back and ends CANCELLED; its unfinished children are cancelled
   * too. A ROLLING_BACK one is returned as is. FAILED_PRECONDITION when it has finished
   * (OPERATION_FINISHED) or its kind is not cancellable (OPERATION_NOT_CANCELLABLE).
   */
  async cancel(id: string): Promise<OpRecord> {
    this.#checkRunning();
    const op = await this.get(id);
    const name = opName(id);
    if (isFinal(op.state))
      throw failedPrecondition(`${name} has already finished (${op.state})`, "OPERATION_FINISHED", {
        operation: name,
      });
    const kind = this.#kinds.get(op.kind);
    if (kind && kind.cancellable === false)
      throw failedPrecondition(`${name} (${op.kind}) cannot be cancelled`, "OPERATION_NOT_CANCELLABLE", {
        operation: name,
        kind: op.kind,
      });
    if (op.state === "rolling_back" || op.cancelRequested) return op;
    const r = this.#runners.get(id);
    let out: OpRecord;
    if (r) {
      out = await this.#commit(r, (o) => {
        o.cancelRequested = true;
      });
      r.cancel.abort(new VmenvError("cancelled", "cancelled by CancelOperation", { reason: CANCEL_REASON }));
    } else if (op.state === "pending" && kind) {
      // Waiting for its lock (or not scheduled yet): it has done nothing; it ends now.
      if (op.lock) this.#waiters.get(op.lock)?.delete(id);
      const pr: Runner = this.#runner(op, kind);
      out = await this.#commit(pr, (o) => {
        o.cancelRequested = true;
        o.state = "cancelled";
        o.endMs = this.#clock.now();
        o.blockedBy = undefined;
        o.error = cancelError(id);
      });
      await this.#finishedOne();
    } else {
      // Not driven by this engine (not resumed yet): the request is kept; the resume rolls it back.
      out = await this.#store.transact(async (tx) => {
        const o = (await this.#read(tx, id)) as OpRecord;
        o.cancelRequested = true;
        o.updateMs = this.#clock.now();
        tx.put(keys.op(id), o as unknown as JsonValue);
        return o;
      });
      this.emit("changed", structuredClone(out));
    }
    this.#log.info({ op: name, kind: op.kind }, "operation cancel requested");
    for (const child of out.children) {
      await this.cancel(child).catch(() => undefined);
    }
    return structuredClone(out);
  }

  /** Whether `cancel` would be accepted now (the API's `may_cancel`). */
  mayCancel(op: OpRecord): boolean {
    return (
      (op.state === "pending" || op.state === "running") &&
      !op.cancelRequested &&
      this.#kinds.get(op.kind)?.cancellable !== false
    );
  }

  /**
   * At start-up: RUNNING operations resume from their first unfinished step (or roll back when their
   * kind says `afterCrash: "rollback"`), ROLLING_BACK ones continue their rollback, PENDING ones queue
   * again in creation order; each one's `resumeCount` grows by one. Operations of unknown kinds end
   * FAILED. Stale lock records are removed. Returns once they are scheduled (not finished).
   */
  async resumeAll(): Promise<void> {
    this.#checkRunning();
    const unfinished: OpRecord[] = [];
    let finished = 0;
    for (const [, v] of await this.#store.list<JsonValue>(keys.opPrefix)) {
      const o = v as unknown as OpRecord;
      if (isFinal(o.state)) finished++;
      else unfinished.push(o);
    }
    this.#finishedCount = finished;
    // Lock records whose holder is gone or finished (cannot happen with atomic batches; cheap to check).
    await this.#store.transact(async (tx) => {
      for (const [key, holder] of await tx.list<string>(keys.lockPrefix)) {
        const h = await this.#read(tx, holder);
        if (!h || isFinal(h.state)) {
          this.#log.warn({ lock: key, op: opName(holder) }, "removing a stale environment lock");
          tx.del(key);
        }
      }
    });
    const order = (o: OpRecord) => (o.state === "pending" ? 1 : 0);
    unfinished.sort((a, b) => order(a) - order(b) || (a.id < b.id ? -1 : 1));
    for (const o of unfinished) {
      const kind = this.#kinds.get(o.kind);
      const pr = this.#runner(o, kind ?? { kind: o.kind, plan: () => [] });
      if (!kind) {
        const error: OpError = {
          code: "failed-precondition",
          message:
            `operation kind "${o.kind}" is not known to this coordinator, so ${opName(o.id)} cannot ` +
            "resume; it was marked FAILED without undoing its steps (check them by hand)",
          reason: "OPERATION_KIND_UNKNOWN",
          metadata: { operation: opName(o.id), kind: o.kind },
        };
        this.#log.error({ op: opName(o.id), kind: o.kind }, "cannot resume an operation of an unknown kind");
        await this.#commit(
          pr,
          (r) => {
            r.state = "failed";
            r.error = error;
            r.endMs = this.#clock.now();
            r.resumeCount += 1;
          },
          (tx, r) => this.#releaseLock(tx, r),
        );
        await this.#finishedOne();
        continue;
      }
      const next = await this.#commit(pr, (r) => {
        r.resumeCount += 1;
        if (r.state === "running" && (r.cancelRequested || kind.afterCrash === "rollback")) {
          r.state = "rolling_back";
          r.error = r.cancelRequested
            ? cancelError(r.id)
            : {
                code: "aborted",
                message: `the coordinator restarted while ${opName(r.id)} ran; its kind rolls back after a crash`,
                reason: "COORDINATOR_RESTARTED",
                metadata: { operation: opName(r.id) },
              };
        }
      });
      this.#log.info({ op: opName(o.id), kind: o.kind, state: next.state }, "resuming operation");
      this.#schedule(next);
    }
  }

  /**
   * Graceful stop: running steps' signals are aborted and the engine waits for them to settle, recording
   * no failure; the operations stay as persisted and resume at the next start.
   */
  async stop(): Promise<void> {
    this.#stopping = true;
    for (const r of this.#runners.values())
      r.stop.abort(new VmenvError("unavailable", "coordinator stopping", { reason: "COORDINATOR_STOPPING" }));
    await this.idle();
  }

  /**
   * Test hook simulating a crash: from now on the engine writes nothing; running steps' signals are
   * aborted and their drivers end. The store keeps what was committed so far, as after a SIGKILL.
   */
  freeze(): void {
    this.#frozen = true;
    this.#stopping = true;
    for (const r of this.#runners.values()) r.stop.abort(new Paused("frozen"));
  }

  /** Resolves when no operation is being driven (all finished, or waiting on nothing). For tests. */
  async idle(): Promise<void> {
    while (this.#drivers.size > 0) await Promise.allSettled([...this.#drivers]);
  }

  // --- internals ---

  #checkRunning(): void {
    if (this.#stopping)
      throw new VmenvError("unavailable", "the coordinator is stopping; retry against its next start", {
        reason: "COORDINATOR_STOPPING",
      });
  }

  #kindOf(kind: string): OperationKind {
    const k = this.#kinds.get(kind);
    if (!k)
      throw new VmenvError("internal", `operation kind "${kind}" is not registered`, {
        reason: "OPERATION_KIND_UNKNOWN",
        metadata: { kind },
      });
    return k;
  }

  #newId(): string {
    const ms = Math.max(this.#clock.now(), this.#lastIdMs);
    if (ms !== this.#lastIdMs) this.#lastIdMs = ms;
    const seq = this.#idSeq++ % 36 ** 4;
    const rand = Math.floor(Math.random() * 36 ** 4);
    return `${ms.toString(36).padStart(9, "0")}-${seq.toString(36).padStart(4, "0")}${rand.toString(36).padStart(4, "0")}`;
  }

  #newRecord(
    kind: string,
    target: string,
    input: JsonValue,
    requestId: string | undefined,
    parent: string | undefined,
  ): OpRecord {
    const now = this.#clock.now();
    return {
      id: this.#newId(),
      kind,
      target,
      state: "pending",
      input,
      data: {},
      steps: [],
      percent: 0,
      stage: "",
      ...(parent ? { parent } : {}),
      children: [],
      createMs: now,
      updateMs: now,
      ...(requestId ? { requestId } : {}),
      resumeCount: 0,
      cancelRequested: false,
    };
  }

  /** The record as this engine knows it: the live one while driven, else the stored one. */
  async #read(tx: Txn, id: string): Promise<OpRecord | undefined> {
    const live = this.#runners.get(id);
    if (live) return structuredClone(live.op);
    return (await tx.get<JsonValue>(keys.op(id))) as unknown as OpRecord | undefined;
  }

  async #fresh(op: OpRecord): Promise<OpRecord> {
    return structuredClone(this.#runners.get(op.id)?.op ?? op);
  }

  /** Whether `id` is `op`'s parent, grandparent, … */
  async #isAncestor(tx: Txn, id: string, op: OpRecord): Promise<boolean> {
    const seen = new Set<string>();
    let p = op.parent;
    while (p && !seen.has(p)) {
      if (p === id) return true;
      seen.add(p);
      p = (await this.#read(tx, p))?.parent;
    }
    return false;
  }

  /**
   * The operation `op` must wait behind for its environment lock, if any: the holder (unless it is `op`
   * or an ancestor: the lock is reentrant for children), else an earlier operation queued for it.
   */
  async #blocker(tx: Txn, op: OpRecord): Promise<string | undefined> {
    if (!op.lock) return undefined;
    const holder = await tx.get<string>(keys.lock(op.lock));
    if (holder !== undefined) {
      if (holder === op.id || (await this.#isAncestor(tx, holder, op))) return undefined;
      return holder;
    }
    const queued = [...(this.#waiters.get(op.lock)?.keys() ?? [])].filter((w) => w < op.id).sort();
    return queued[0];
  }

  #runner(op: OpRecord, kind: OperationKind): Runner {
    return { op, kind, stop: new AbortController(), cancel: new AbortController() };
  }

  /** Starts driving an operation in the background (no-op when it is driven already). */
  #schedule(op: OpRecord): void {
    if (this.#runners.has(op.id) || this.#stopping) return;
    const kind = this.#kinds.get(op.kind);
    if (!kind) return;
    const r = this.#runner(op, kind);
    this.#runners.set(op.id, r);
    const d = this.#drive(r)
      .catch((err: unknown) => {
        if (err instanceof Paused || this.#frozen) return;
        this.#log.error({ err, op: opName(r.op.id), kind: r.op.kind }, "operation engine failure");
      })
      .finally(() => {
        this.#runners.delete(r.op.id);
        this.#drivers.delete(d);
      });
    this.#drivers.add(d);
  }

  /**
   * Commits a change of a driven operation: `mutate` a copy, let `extra` add writes to the same
   * transaction (it may throw: nothing is written), then the copy becomes the live record.
   */
  async #commit(
    r: Runner,
    mutate: (op: OpRecord) => void,
    extra?: (tx: Txn, op: OpRecord) => Promise<void>,
  ): Promise<OpRecord> {
    if (this.#frozen) throw new Paused("frozen");
    const next = await this.#store.transact(async (tx) => {
      if (this.#frozen) throw new Paused("frozen");
      const op = structuredClone(r.op);
      mutate(op);
      op.updateMs = this.#clock.now();
      if (extra) await extra(tx, op);
      tx.put(keys.op(op.id), op as unknown as JsonValue);
      // The live record changes with the commit, before any later transaction clones it.
      tx.afterCommit(() => {
        r.op = op;
      });
      return op;
    });
    this.emit("changed", structuredClone(next));
    return next;
  }

  #point(r: Runner, step: string, phase: CrashPhase): void {
    const n = ++this.#points;
    this.#log.debug({ crashPoint: n, op: opName(r.op.id), kind: r.op.kind, step, phase }, "crash point");
    if (n === this.#crashPoint) {
      this.#log.warn({ crashPoint: n, op: opName(r.op.id), step, phase }, "crash point reached: crashing");
      this.#crash();
    }
    if (this.#frozen) throw new Paused("frozen");
  }

  async #drive(r: Runner): Promise<void> {
    if (r.op.state === "pending" && !(await this.#acquire(r))) return;
    if (r.op.state === "running") await this.#runSteps(r);
    if (r.op.state === "rolling_back") await this.#rollback(r);
  }

  /**
   * PENDING → RUNNING, taking the environment lock in the same transaction. While the lock is held by
   * another operation (or an earlier one waits for it) the operation stays PENDING with `blockedBy`, and
   * waits here to be woken. False when it ended instead (cancelled while pending).
   */
  async #acquire(r: Runner): Promise<boolean> {
    const env = r.op.lock;
    let logged = false;
    for (;;) {
      if (r.op.cancelRequested) {
        await this.#commit(r, (o) => {
          o.state = "cancelled";
          o.endMs = this.#clock.now();
          o.error = cancelError(o.id);
          o.blockedBy = undefined;
        });
        if (env) {
          this.#waiters.get(env)?.delete(r.op.id);
          // Others may have queued behind this one rather than behind a holder.
          if ((await this.#store.get(keys.lock(env))) === undefined) this.#wake(env);
        }
        this.#log.info({ op: opName(r.op.id), kind: r.op.kind }, "operation cancelled before it ran");
        await this.#finishedOne();
        return false;
      }
      let blocked: string | undefined;
      let woken: Promise<void> | undefined;
      await this.#commit(
        r,
        () => undefined,
        async (tx, o) => {
          blocked = await this.#blocker(tx, o);
          if (blocked && env) {
            const queue = this.#waiters.get(env) ?? new Map<string, () => void>();
            woken = new Promise<void>((resolve) => queue.set(o.id, resolve));
            this.#waiters.set(env, queue);
            o.blockedBy = blocked;
            return;
          }
          if (env && (await tx.get<string>(keys.lock(env))) === undefined) tx.put(keys.lock(env), o.id);
          o.state = "running";
          o.startMs ??= this.#clock.now();
          o.blockedBy = undefined;
        },
      );
      if (!blocked) {
        this.#log.info({ op: opName(r.op.id), kind: r.op.kind, target: r.op.target }, "operation running");
        return true;
      }
      if (!logged) {
        logged = true;
        this.#log.info(
          { op: opName(r.op.id), blockedBy: opName(blocked), environment: env },
          "operation waits for its environment lock",
        );
      }
      await untilAborted(woken as Promise<void>, r.stop.signal, r.cancel.signal);
      if (r.stop.signal.aborted) {
        if (env) this.#waiters.get(env)?.delete(r.op.id);
        throw new Paused("stopping");
      }
    }
  }

  /** Deletes the operation's lock record when it holds it, and wakes the next waiter after the commit. */
  async #releaseLock(tx: Txn, op: OpRecord): Promise<void> {
    op.blockedBy = undefined;
    const env = op.lock;
    if (!env) return;
    this.#waiters.get(env)?.delete(op.id);
    if ((await tx.get<string>(keys.lock(env))) === op.id) {
      tx.del(keys.lock(env));
      tx.afterCommit(() => this.#wake(env));
    }
  }

  /** The lock of `env` is free: the earliest operation waiting for it tries again. */
  #wake(env: string): void {
    const queue = this.#waiters.get(env);
    if (!queue || queue.size === 0) return;
    const first = [...queue.keys()].sort()[0] as string;
    const resolve = queue.get(first);
    queue.delete(first);
    if (queue.size === 0) this.#waiters.delete(env);
    resolve?.();
  }

  async #plan(r: Runner): Promise<StepDef[]> {
    const defs = await r.kind.plan(structuredClone(r.op));
    const ids = new Set<string>();
    for (const d of defs) {
      if (ids.has(d.id)) throw new Error(`${r.op.kind} planned step ${d.id} twice`);
      ids.add(d.id);
    }
    return defs;
  }

  async #runSteps(r: Runner): Promise<void> {
    for (;;) {
      if (r.op.cancelRequested) return this.#beginRollback(r, cancelError(r.op.id));
      let defs: StepDef[];
      try {
        defs = await this.#plan(r);
      } catch (err) {
        return this.#beginRollback(r, this.#errorOf(r, err, "planning"));
      }
      r.op.steps = mergeSteps(r.op.steps, defs, r.op.id);
      const step = r.op.steps.find((s) => s.state === "pending" || s.state === "running");
      if (!step) return this.#succeed(r);
      const def = defs.find((d) => d.id === step.id) as StepDef;
      const failure = await this.#runStep(r, def);
      if (failure) return;
    }
  }

  /** Runs one step to its committed completion; true when it failed (the operation is then ROLLING_BACK). */
  async #runStep(r: Runner, def: StepDef): Promise<boolean> {
    const firstMs = this.#clock.now();
    let retries = 0;
    for (;;) {
      await this.#commit(r, (o) => {
        const s = stepOf(o, def.id);
        s.state = "running";
        s.attempts += 1;
        s.startMs ??= this.#clock.now();
        s.description = def.description;
        if (def.agent) s.agent = def.agent;
        s.error = undefined;
      });
      this.#point(r, def.id, "step-started");
      const onComplete: Array<(tx: Txn) => Promise<void>> = [];
      const signal = AbortSignal.any([r.stop.signal, r.cancel.signal]);
      try {
        if (signal.aborted) throw signal.reason;
        await def.run(this.#context(r, def.id, signal, onComplete, "run"));
        if (r.stop.signal.aborted) throw new Paused("stopping");
      } catch (err) {
        if (r.stop.signal.aborted || err instanceof Paused) throw new Paused("stopping");
        if (r.cancel.signal.aborted) {
          await this.#failStep(r, def.id, cancelError(r.op.id));
          return true;
        }
        const elapsed = this.#clock.now() - firstMs;
        if (isTransient(err) && retries < this.#retry.attempts && elapsed < this.#retry.totalMs) {
          const delay = Math.min(this.#retry.baseDelayMs * 2 ** retries, this.#retry.maxDelayMs);
          retries += 1;
          this.#log.warn(
            { err, op: opName(r.op.id), step: def.id, retry: retries, delayMs: delay },
            "step failed with a transient error; retrying",
          );
          try {
            await sleep(delay, signal);
          } catch {
            if (r.stop.signal.aborted) throw new Paused("stopping");
            await this.#failStep(r, def.id, cancelError(r.op.id));
            return true;
          }
          continue;
        }
        await this.#failStep(r, def.id, this.#errorOf(r, err, def.id));
        return true;
      }
      this.#point(r, def.id, "step-ran");
      try {
        await this.#commit(
          r,
          (o) => {
            const s = stepOf(o, def.id);
            s.state = "succeeded";
            s.endMs = this.#clock.now();
          },
          async (tx) => {
            for (const fn of onComplete) await fn(tx);
          },
        );
      } catch (err) {
        if (err instanceof Paused) throw err;
        await this.#failStep(r, def.id, this.#errorOf(r, err, def.id));
        return true;
      }
      this.#point(r, def.id, "step-completed");
      return false;
    }
  }

  #context(
    r: Runner,
    stepId: string,
    signal: AbortSignal,
    onComplete: Array<(tx: Txn) => Promise<void>>,
    phase: "run" | "undo",
  ): StepContext {
    const engine = this;
    const requestId = `${r.op.id}.${stepId}`;
    return {
      get op() {
        return r.op;
      },
      get step() {
        return stepOf(r.op, stepId);
      },
      requestId,
      signal,
      async save(values) {
        await engine.#commit(r, (o) => {
          Object.assign(o.data, structuredClone(values));
        });
      },
      onComplete(fn) {
        onComplete.push(fn);
      },
      progress(percent, stage) {
        r.op.percent = Math.max(0, Math.min(100, Math.round(percent)));
        r.op.stage = stage;
        r.op.updateMs = engine.#clock.now();
        engine.emit("changed", structuredClone(r.op));
      },
      async recordAgentOperation(agent, operation) {
        await engine.#commit(r, (o) => {
          const s = stepOf(o, stepId);
          s.agent = agent;
          s.agentOperation = operation;
        });
      },
      async child(kind, target, input) {
        // The run's child is the step's `childOperation`; an undo's child is kept in op.data, so that
        // a resumed undo waits for its own child, not for the one the run started.
        const undoKey = `undoChild:${stepId}`;
        const recorded =
          phase === "run" ? stepOf(r.op, stepId).childOperation : (r.op.data[undoKey] as string | undefined);
        let childId = recorded?.replace(/^operations\//, "");
        if (!childId) {
          const k = engine.#kindOf(kind);
          const rec = engine.#newRecord(kind, target, input, undefined, r.op.id);
          rec.lock = k.lock?.(rec);
          await engine.#commit(
            r,
            (o) => {
              if (phase === "run") stepOf(o, stepId).childOperation = opName(rec.id);
              else o.data[undoKey] = opName(rec.id);
              o.children.push(rec.id);
            },
            async (tx) => {
              tx.put(keys.op(rec.id), rec as unknown as JsonValue);
            },
          );
          engine.emit("changed", structuredClone(rec));
          engine.#log.info(
            { op: opName(rec.id), kind, target, parent: opName(r.op.id) },
            "child operation accepted",
          );
          engine.#schedule(rec);
          childId = rec.id;
        }
        return engine.#waitFinal(childId, signal);
      },
    };
  }

  /** Waits until the operation is final; rejects with the signal's reason when it aborts first. */
  #waitFinal(id: string, signal: AbortSignal): Promise<OpRecord> {
    return new Promise<OpRecord>((resolve, reject) => {
      let done = false;
      const finish = (fn: () => void) => {
        if (done) return;
        done = true;
        this.off("changed", onChange);
        signal.removeEventListener("abort", onAbort);
        fn();
      };
      const onChange = (o: OpRecord) => {
        if (o.id === id && isFinal(o.state)) finish(() => resolve(o));
      };
      const onAbort = () => finish(() => reject(signal.reason));
      this.on("changed", onChange);
      signal.addEventListener("abort", onAbort, { once: true });
      if (signal.aborted) return onAbort();
      this.get(id).then(
        (o) => {
          if (isFinal(o.state)) finish(() => resolve(o));
        },
        (err: unknown) => finish(() => reject(err)),
      );
    });
  }

  /** An error as recorded, logging causes that are not user-facing errors. */
  #errorOf(r: Runner, err: unknown, where: string): OpError {
    const { error, known } = toOpError(err);
    if (!known)
      this.#log.error({ err, op: opName(r.op.id), kind: r.op.kind, step: where }, "step failed unexpectedly");
    return error;
  }

  async #failStep(r: Runner, stepId: string, error: OpError): Promise<void> {
    await this.#commit(r, (o) => {
      const s = stepOf(o, stepId);
      s.state = "failed";
      s.error = error;
      s.endMs = this.#clock.now();
      o.state = "rolling_back";
      o.error = error;
    });
    this.#log.info({ op: opName(r.op.id), step: stepId, error }, "step failed; rolling back");
  }

  async #beginRollback(r: Runner, error: OpError): Promise<void> {
    await this.#commit(r, (o) => {
      o.state = "rolling_back";
      o.error = error;
    });
  }

  async #succeed(r: Runner): Promise<void> {
    try {
      await this.#commit(
        r,
        (o) => {
          o.state = "succeeded";
          o.endMs = this.#clock.now();
          o.percent = 100;
          o.error = undefined;
        },
        async (tx, o) => {
          const result = await r.kind.result?.(structuredClone(o), tx);
          if (result !== undefined) o.result = result;
          await this.#releaseLock(tx, o);
        },
      );
    } catch (err) {
      if (err instanceof Paused) throw err;
      return this.#beginRollback(r, this.#errorOf(r, err, "result"));
    }
    this.#log.info({ op: opName(r.op.id), kind: r.op.kind, target: r.op.target }, "operation succeeded");
    await this.#finishedOne();
  }

  /** Undoes the steps that ran, in reverse order, then ends FAILED (or CANCELLED). */
  async #rollback(r: Runner): Promise<void> {
    let defs: StepDef[] = [];
    try {
      defs = await this.#plan(r);
    } catch (err) {
      this.#log.error({ err, op: opName(r.op.id) }, "cannot plan the rollback; steps stay as they are");
    }
    let incomplete: OpError | undefined;
    const undoable: StepState[] = ["succeeded", "failed", "running", "rolling_back"];
    for (let i = r.op.steps.length - 1; i >= 0 && !incomplete; i--) {
      const s = r.op.steps[i] as StepRecord;
      if (!undoable.includes(s.state)) continue;
      const def = defs.find((d) => d.id === s.id);
      if (!def?.undo) {
        if (s.state !== "failed")
          await this.#commit(r, (o) => {
            const x = stepOf(o, s.id);
            x.state = "rolled_back";
            x.endMs = this.#clock.now();
          });
        continue;
      }
      incomplete = await this.#undoStep(r, def);
    }
    const cancelled = r.op.error?.reason === CANCEL_REASON;
    await this.#commit(
      r,
      (o) => {
        o.state = cancelled && !incomplete ? "cancelled" : "failed";
        if (incomplete) o.error = incomplete;
        o.endMs = this.#clock.now();
      },
      async (tx, o) => {
        try {
          await r.kind.onFailed?.(structuredClone(o), tx);
        } catch (err) {
          // The final state is written anyway; what onFailed meant to write is left to the collector.
          this.#log.error({ err, op: opName(o.id), kind: o.kind }, "onFailed of a failed operation threw");
        }
        await this.#releaseLock(tx, o);
      },
    );
    this.#log.info(
      { op: opName(r.op.id), kind: r.op.kind, state: r.op.state, error: r.op.error },
      "operation ended",
    );
    await this.#finishedOne();
  }

  /** Undoes one step, retrying transient errors; an OpError when its rollback stays incomplete. */
  async #undoStep(r: Runner, def: StepDef): Promise<OpError | undefined> {
    const firstMs = this.#clock.now();
    let retries = 0;
    for (;;) {
      await this.#commit(r, (o) => {
        stepOf(o, def.id).state = "rolling_back";
      });
      this.#point(r, def.id, "undo-started");
      const signal = r.stop.signal;
      try {
        if (signal.aborted) throw new Paused("stopping");
        await def.undo?.(this.#context(r, def.id, signal, [], "undo"));
        if (signal.aborted) throw new Paused("stopping");
      } catch (err) {
        if (signal.aborted || err instanceof Paused) throw new Paused("stopping");
        const elapsed = this.#clock.now() - firstMs;
        if (isTransient(err) && retries < this.#retry.attempts && elapsed < this.#retry.totalMs) {
          const delay = Math.min(this.#retry.baseDelayMs * 2 ** retries, this.#retry.maxDelayMs);
          retries += 1;
          this.#log.warn(
            { err, op: opName(r.op.id), step: def.id, retry: retries },
            "undo failed with a transient error; retrying",
          );
          try {
            await sleep(delay, signal);
          } catch {
            throw new Paused("stopping");
          }
          continue;
        }
        const cause = this.#errorOf(r, err, def.id);
        const first = r.op.error;
        this.#log.error(
          { op: opName(r.op.id), kind: r.op.kind, step: def.id, cause },
          "rollback incomplete: a step could not be undone; its effects may remain",
        );
        return {
          code: "internal",
          message:
            `${first ? `${first.message}; ` : ""}rollback incomplete: undoing step "${def.id}" of ` +
            `${opName(r.op.id)} failed: ${cause.message}`,
          reason: "ROLLBACK_INCOMPLETE",
          metadata: {
            operation: opName(r.op.id),
            step: def.id,
            ...(first ? { error_reason: first.reason } : {}),
            undo_reason: cause.reason,
          },
        };
      }
      this.#point(r, def.id, "undo-ran");
      await this.#commit(r, (o) => {
        const s = stepOf(o, def.id);
        s.state = "rolled_back";
        s.endMs = this.#clock.now();
      });
      this.#point(r, def.id, "undo-completed");
      return undefined;
    }
  }

  /** One more finished operation; prunes the oldest finished ones beyond `keepFinished`. */
  async #finishedOne(): Promise<void> {
    this.#finishedCount += 1;
    if (this.#finishedCount <= this.#keepFinished || this.#frozen) return;
    // Prune in batches, so that a scan is not paid for every finished operation.
    const excess = this.#finishedCount - this.#keepFinished + Math.ceil(this.#keepFinished / 10);
    let pruned = 0;
    try {
      await this.#store.transact(async (tx) => {
        for (const [key, v] of await tx.list<JsonValue>(keys.opPrefix)) {
          if (pruned >= excess) break;
          const o = v as unknown as OpRecord;
          if (!isFinal(o.state)) continue;
          if (o.parent) {
            const p = await this.#read(tx, o.parent);
            if (p && !isFinal(p.state)) continue;
          }
          tx.del(key);
          if (o.requestId && (await tx.get<string>(keys.opRequest(o.requestId))) === o.id)
            tx.del(keys.opRequest(o.requestId));
          pruned++;
        }
      });
      this.#finishedCount -= pruned;
      if (pruned > 0) this.#log.debug({ pruned }, "pruned old finished operations");
    } catch (err) {
      this.#log.warn({ err }, "could not prune old operations");
    }
  }
}

function cancelError(id: string): OpError {
  return {
    code: "cancelled",
    message: `${opName(id)} was cancelled by CancelOperation and rolled back`,
    reason: CANCEL_REASON,
    metadata: { operation: opName(id) },
  };
}

function stepOf(op: OpRecord, id: string): StepRecord {
  const s = op.steps.find((x) => x.id === id);
  if (!s) throw new Error(`step ${id} of ${opName(op.id)} is not recorded`);
  return s;
}

/**
 * The steps as recorded after a (re)plan: the planned ones in plan order (recorded ones keep their
 * record), with recorded steps the plan no longer names kept where they were if they ever started.
 */
export function mergeSteps(
  recorded: readonly StepRecord[],
  defs: readonly StepDef[],
  opId: string,
): StepRecord[] {
  const byId = new Map(recorded.map((s) => [s.id, s]));
  const out: StepRecord[] = defs.map(
    (d) =>
      byId.get(d.id) ?? {
        id: d.id,
        description: d.description,
        state: "pending",
        attempts: 0,
        ...(d.agent ? { agent: d.agent } : {}),
        requestId: `${opId}.${d.id}`,
      },
  );
  const planned = new Set(defs.map((d) => d.id));
  recorded.forEach((s, i) => {
    if (!planned.has(s.id) && s.state !== "pending") out.splice(Math.min(i, out.length), 0, s);
  });
  return out;
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** Resolves when `p` does or when any signal aborts. */
function untilAborted(p: Promise<void>, ...signals: AbortSignal[]): Promise<void> {
  const any = AbortSignal.any(signals);
  if (any.aborted) return Promise.resolve();
  return Promise.race([
    p,
    new Promise<void>((resolve) => any.addEventListener("abort", () => resolve(), { once: true })),
  ]);
}
