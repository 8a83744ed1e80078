import { EventEmitter } from "node:events";
import { notFound, VmenvError } from "@vmenv/rpc/errors";
import { operationContext } from "./context.js";

export type OperationState = "pending" | "running" | "succeeded" | "failed" | "cancelled";

/** A slow or mutating agent action, as callers see it. */
export interface OperationRecord<R = unknown> {
  id: string;
  kind: string;
  /** Resource name the action is on, e.g. `vms/web-1`. */
  target: string;
  state: OperationState;
  percent: number;
  stage: string;
  mayCancel: boolean;
  createTimeMs: number;
  startTimeMs: number | undefined;
  endTimeMs: number | undefined;
  error: VmenvError | Error | undefined;
  result: R | undefined;
  requestId: string | undefined;
  /** What the action reports while it runs (e.g. a migration's progress), packed like `result`. */
  metadata?: unknown;
}

/** What a running action may tell about itself. */
export interface OperationHandle {
  readonly id: string;
  readonly signal: AbortSignal;
  progress(percent: number, stage: string): void;
  /** Replaces the operation's metadata (reported on the next change). */
  metadata(m: unknown): void;
}

/** A change WatchOperations reports: the operation as it was right after it. */
export interface OperationChange {
  type: "created" | "updated" | "deleted";
  op: OperationRecord;
  seq: number;
  timeMs: number;
}

/** Changes kept for WatchOperations' resume tokens. */
const HISTORY = 2000;

/**
 * The agent's operations, in memory: the last `keep` finished ones and every running one. A
 * `request_id` seen before returns the operation it started (retry-safe replay).
 */
export class Operations extends EventEmitter<{ changed: [OperationRecord]; change: [OperationChange] }> {
  readonly #ops = new Map<string, OperationRecord>();
  /** Recent changes, oldest first, for WatchOperations' resume tokens. */
  readonly history: OperationChange[] = [];
  #changeSeq = 0;
  readonly #controllers = new Map<string, AbortController>();
  readonly #byRequest = new Map<string, string>();
  #seq = 0;

  constructor(
    private readonly now: () => number = Date.now,
    private readonly keep = 1000,
    /** Told about every operation that failed, with its error (the agent logs them). */
    private readonly onFailed: (op: OperationRecord, err: Error) => void = () => undefined,
  ) {
    super();
    this.setMaxListeners(0);
  }

  /** The operation a request id started, if any. */
  byRequestId(requestId: string | undefined): OperationRecord | undefined {
    if (!requestId) return undefined;
    const id = this.#byRequest.get(requestId);
    return id === undefined ? undefined : this.#ops.get(id);
  }

  /** Records and starts `run`; returns at once with the operation (state running). */
  start<R>(
    kind: string,
    target: string,
    run: (op: OperationHandle) => Promise<R>,
    opts: { requestId?: string; mayCancel?: boolean } = {},
  ): OperationRecord<R> {
    const id = `${this.now().toString(36)}-${(++this.#seq).toString(36)}`;
    const t = this.now();
    const op: OperationRecord<R> = {
      id,
      kind,
      target,
      state: "running",
      percent: 0,
      stage: "started",
      mayCancel: opts.mayCancel ?? false,
      createTimeMs: t,
      startTimeMs: t,
      endTimeMs: undefined,
      error: undefined,
      result: undefined,
      requestId: opts.requestId || undefined,
    };
    const ac = new AbortController();
    this.#ops.set(id, op as OperationRecord);
    this.#controllers.set(id, ac);
    if (op.requestId) this.#byRequest.set(op.requestId, id);
    this.#changed(op as OperationRecord, "created");
    const handle: OperationHandle = {
      id,
      signal: ac.signal,
      progress: (percent, stage) => {
        op.percent = percent;
        op.stage = stage;
        this.#changed(op as OperationRecord, "updated");
      },
      metadata: (m) => {
        op.metadata = m;
      },
    };
    // Log lines written while it runs name the operation and its target.
    const ctx = { operation: `operations/${id}`, target, active: true };
    operationContext
      .run(ctx, () => run(handle))
      .then(
        (result) => {
          this.#finish(op, ac.signal.aborted ? "cancelled" : "succeeded", undefined, result);
          ctx.active = false;
        },
        (err: unknown) => {
          this.#finish(op, ac.signal.aborted ? "cancelled" : "failed", err as Error, undefined);
          if (!ac.signal.aborted) this.onFailed(op as OperationRecord, err as Error);
          ctx.active = false;
        },
      );
    return op;
  }

  /** An operation that finished at once (a NOOP, or a replay with nothing to do). */
  done<R>(kind: string, target: string, result: R, requestId?: string): OperationRecord<R> {
    return this.start(kind, target, async () => result, requestId ? { requestId } : {});
  }

  #finish<R>(
    op: OperationRecord<R>,
    state: OperationState,
    error: Error | undefined,
    result: R | undefined,
  ): void {
    op.state = state;
    op.error = error;
    op.result = result;
    op.endTimeMs = this.now();
    op.percent = state === "succeeded" ? 100 : op.percent;
    op.stage = state;
    op.mayCancel = false;
    this.#controllers.delete(op.id);
    this.#changed(op as OperationRecord, "updated");
    this.#trim();
  }

  /** The sequence number of the latest change (0 before any). */
  get seq(): number {
    return this.#changeSeq;
  }

  #changed(op: OperationRecord, type: OperationChange["type"]): void {
    const c: OperationChange = { type, op: { ...op }, seq: ++this.#changeSeq, timeMs: this.now() };
    this.history.push(c);
    if (this.history.length > HISTORY) this.history.splice(0, this.history.length - HISTORY);
    if (type !== "deleted") this.emit("changed", op);
    this.emit("change", c);
  }

  #trim(): void {
    const finished = [...this.#ops.values()].filter((o) => o.endTimeMs !== undefined);
    for (const o of finished.slice(0, Math.max(0, finished.length - this.keep))) {
      this.#ops.delete(o.id);
      if (o.requestId) this.#byRequest.delete(o.requestId);
      this.#changed(o, "deleted");
    }
  }

  get(id: string): OperationRecord {
    const op = this.#ops.get(id);
    if (!op) throw notFound("operation", `operations/${id}`);
    return op;
  }

  list(): OperationRecord[] {
    return [...this.#ops.values()];
  }

  /** Resolves when the operation has finished, or after `timeoutMs` with it as it is then. */
  async wait(id: string, timeoutMs: number, signal?: AbortSignal): Promise<OperationRecord> {
    const op = this.get(id);
    if (op.endTimeMs !== undefined) return op;
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.off("changed", onChange);
        signal?.removeEventListener("abort", done);
        resolve();
      };
      const onChange = (o: OperationRecord) => {
        if (o.id === id && o.endTimeMs !== undefined) done();
      };
      const t = setTimeout(done, timeoutMs);
      this.on("changed", onChange);
      signal?.addEventListener("abort", done, { once: true });
    });
    return op;
  }

  /** Asks a running operation to stop; FAILED_PRECONDITION when it cannot. */
  cancel(id: string): OperationRecord {
    const op = this.get(id);
    if (op.endTimeMs !== undefined) return op;
    if (!op.mayCancel) {
      throw new VmenvError(
        "failed-precondition",
        `operations/${id} (${op.kind}) cannot be cancelled safely`,
        {
          reason: "OPERATION_NOT_CANCELLABLE",
          metadata: { operation: `operations/${id}` },
        },
      );
    }
    this.#controllers
      .get(id)
      ?.abort(new VmenvError("cancelled", "cancelled by request", { reason: "CANCELLED" }));
    return op;
  }
}
