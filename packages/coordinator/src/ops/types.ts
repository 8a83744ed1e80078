import type { JsonValue, Txn } from "../store/store.js";

/**
 * The contract between the operation engine (engine.ts) and the operation kinds that run on it
 * (environment.create, environment.delete, …). The engine persists an operation before anything
 * happens, runs its steps one by one, persists each step's completion (together with the writes the
 * step asked for, in one transaction), and after a coordinator crash resumes every unfinished operation
 * from its first unfinished step — or rolls it back, undoing completed steps in reverse order.
 *
 * Steps must be idempotent ("measure, then act"): a crash between a step's effect and the write of its
 * completion runs the step again. Agent calls carry `ctx.requestId`, the same on every attempt, so the
 * agent replays instead of acting twice.
 */

export type OpState = "pending" | "running" | "rolling_back" | "succeeded" | "failed" | "cancelled";
export type StepState =
  | "pending"
  | "running"
  | "succeeded"
  | "failed"
  | "skipped"
  | "rolling_back"
  | "rolled_back";

/** A failure as an operation records it (a VmenvError, flattened). */
export interface OpError {
  /** Canonical code in the @vmenv/rpc ErrorCode spelling, e.g. "resource-exhausted". */
  code: string;
  message: string;
  reason: string;
  metadata: Record<string, string>;
}

export interface StepRecord {
  id: string;
  description: string;
  state: StepState;
  attempts: number;
  startMs?: number;
  endMs?: number;
  error?: OpError;
  /** `agents/{agent}` the step acts on. */
  agent?: string;
  /** The agent operation the step started, `operations/{id}` in the agent's API. */
  agentOperation?: string;
  /** The child operation the step started and waits for, `operations/{id}`. */
  childOperation?: string;
  /** `${opId}.${stepId}`: the request id of the step's agent calls, the same on every attempt. */
  requestId: string;
}

/** An operation as it is stored at `op/{id}`. */
export interface OpRecord {
  id: string;
  kind: string;
  /** Resource name acted on, e.g. `environments/shop`. */
  target: string;
  state: OpState;
  /** What the kind needs to plan its steps: the request, in the kind's own JSON shape. */
  input: JsonValue;
  /** Values steps saved (ctx.save) for later steps and for resumes: placement decisions, names … */
  data: Record<string, JsonValue>;
  steps: StepRecord[];
  percent: number;
  stage: string;
  parent?: string;
  children: string[];
  /** Environment id whose lock the operation takes. */
  lock?: string;
  /** While pending: the operation holding the lock it waits for. */
  blockedBy?: string;
  createMs: number;
  startMs?: number;
  updateMs: number;
  endMs?: number;
  error?: OpError;
  /** Kind-specific result (e.g. the environment id); the RPC layer turns it into the API's Any. */
  result?: JsonValue;
  requestId?: string;
  resumeCount: number;
  cancelRequested: boolean;
}

export interface StepContext {
  /** The operation as persisted before this step ran (data from earlier steps included). */
  readonly op: Readonly<OpRecord>;
  readonly step: Readonly<StepRecord>;
  /** Request id for the step's agent calls: the same on every attempt and resume. */
  readonly requestId: string;
  /** Aborted when the operation is cancelled or the coordinator stops. */
  readonly signal: AbortSignal;
  /** Persists values into `op.data` now, before the step acts on them (e.g. a chosen agent). */
  save(values: Record<string, JsonValue>): Promise<void>;
  /**
   * Registers writes to commit in the same transaction as the step's completion (e.g. a member's
   * record, an agent's allocation, the tree's usage). Runs inside the transaction; may throw to fail
   * the step (e.g. a quota check), in which case nothing of it is written.
   */
  onComplete(fn: (tx: Txn) => Promise<void>): void;
  progress(percent: number, stage: string): void;
  /** Records the agent operation the step started (shown in the step; used by resumes). */
  recordAgentOperation(agent: string, operation: string): Promise<void>;
  /**
   * Starts a child operation (persisted with this one as parent) and waits until it ends; resolves
   * with the child in whatever final state it reached (SUCCEEDED, FAILED or CANCELLED: check it).
   * On a resume the child recorded by the step is waited for instead of starting another. A child
   * whose kind takes the lock its parent (or an ancestor) holds runs under it.
   */
  child(kind: string, target: string, input: JsonValue): Promise<OpRecord>;
}

export interface StepDef {
  id: string;
  description: string;
  /** `agents/{agent}` when the step acts on an agent. */
  agent?: string;
  /** Does the step's work. Idempotent. Throw a VmenvError to fail the operation (it rolls back). */
  run(ctx: StepContext): Promise<void>;
  /**
   * Undoes the step's work, for rollback. Idempotent. Absent: nothing to undo. Called for every step
   * that started — the completed ones, and also the one that failed or was interrupted by a crash or a
   * cancel, since its run may have acted partly — so it must accept "nothing there" (measure first).
   * A child started from an undo (`ctx.child`) is its own, not the run's.
   */
  undo?(ctx: StepContext): Promise<void>;
}

export interface OperationKind {
  /** `<resource>.<verb>`, e.g. "environment.create". */
  kind: string;
  /** The environment whose lock the operation takes (operations on one environment run one at a time). */
  lock?(op: OpRecord): string | undefined;
  /**
   * The steps, planned from the record (input + data saved so far). Called before the first step and
   * again after every completed step and on resume, so later steps can depend on what earlier ones
   * learned; ids of steps already recorded must stay stable.
   */
  plan(op: OpRecord): StepDef[] | Promise<StepDef[]>;
  /** What the operation produced, once every step succeeded; written with the final state. */
  result?(op: OpRecord, tx: Txn): Promise<JsonValue | undefined>;
  /** Writes to make when the operation fails or is cancelled, after its steps were undone. */
  onFailed?(op: OpRecord, tx: Txn): Promise<void>;
  /** After a coordinator crash: go on from the first unfinished step (default), or roll back. */
  afterCrash?: "resume" | "rollback";
  /** Whether CancelOperation may stop it (between steps; then it rolls back). Default true. */
  cancellable?: boolean;
}
