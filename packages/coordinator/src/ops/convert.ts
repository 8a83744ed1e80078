import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { type Any, anyPack, timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  type Operation,
  OperationSchema,
  OperationState as StatePb,
  StepState as StepPb,
} from "@vmenv/api/coordinator/v1";
import { type Status, StatusSchema } from "@vmenv/api/google/rpc";
import { toConnectError } from "@vmenv/rpc";
import { fromOpError } from "./errors.js";
import type { OpError, OpRecord, OpState, StepState } from "./types.js";

/** Packs what an operation produced for the API: `result` (the resource), `metadata` (kind details). */
export type PackOperation = (op: OpRecord) => { result?: Any; metadata?: Any };

const states: Record<OpState, StatePb> = {
  pending: StatePb.PENDING,
  running: StatePb.RUNNING,
  rolling_back: StatePb.ROLLING_BACK,
  succeeded: StatePb.SUCCEEDED,
  failed: StatePb.FAILED,
  cancelled: StatePb.CANCELLED,
};

const stepStates: Record<StepState, StepPb> = {
  pending: StepPb.PENDING,
  running: StepPb.RUNNING,
  succeeded: StepPb.SUCCEEDED,
  failed: StepPb.FAILED,
  skipped: StepPb.SKIPPED,
  rolling_back: StepPb.ROLLING_BACK,
  rolled_back: StepPb.ROLLED_BACK,
};

/** The API's state → the engine's; undefined for UNSPECIFIED or unknown numbers. */
export function fromPbOpState(s: StatePb): OpState | undefined {
  return (Object.keys(states) as OpState[]).find((k) => states[k] === s);
}

/** A recorded error as google.rpc.Status: its code, message and ErrorInfo (reason, domain, metadata). */
export function toStatus(e: OpError): Status {
  const ce = toConnectError(fromOpError(e));
  const details = ce.details.flatMap((d) =>
    "desc" in d ? [anyPack(d.desc, create(d.desc as DescMessage, d.value as MessageShape<DescMessage>))] : [],
  );
  return create(StatusSchema, { code: ce.code, message: ce.rawMessage, details });
}

const opName = (id: string) => `operations/${id}`;
const ts = (ms: number | undefined) => (ms === undefined ? undefined : timestampFromMs(ms));

/** The engine's record → vmenv.coordinator.v1.Operation. */
export function toPbOperation(op: OpRecord, pack: PackOperation, mayCancel: boolean): Operation {
  const packed = pack(op);
  return create(OperationSchema, {
    name: opName(op.id),
    id: op.id,
    kind: op.kind,
    target: op.target,
    state: states[op.state],
    progress: { percent: op.percent, stage: op.stage },
    mayCancel,
    steps: op.steps.map((s) => ({
      id: s.id,
      description: s.description,
      state: stepStates[s.state],
      attempts: s.attempts,
      startTime: ts(s.startMs),
      endTime: ts(s.endMs),
      error: s.error ? toStatus(s.error) : undefined,
      agent: s.agent ?? "",
      agentOperation: s.agentOperation ?? "",
      childOperation: s.childOperation ?? "",
      requestId: s.requestId,
    })),
    parent: op.parent ? opName(op.parent) : "",
    children: op.children.map(opName),
    environmentLock: op.lock ? `environments/${op.lock}` : "",
    blockedBy: op.blockedBy ? opName(op.blockedBy) : "",
    createTime: timestampFromMs(op.createMs),
    startTime: ts(op.startMs),
    updateTime: timestampFromMs(op.updateMs),
    endTime: ts(op.endMs),
    error: op.error ? toStatus(op.error) : undefined,
    result: op.state === "succeeded" ? packed.result : undefined,
    metadata: packed.metadata,
    requestId: op.requestId ?? "",
    resumeCount: op.resumeCount,
  });
}
