import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { type Any, anyPack, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { type Operation, OperationSchema, OperationState as StatePb } from "@vmenv/api/agent/v1";
import { ErrorInfoSchema, StatusSchema } from "@vmenv/api/google/rpc";
import { ERROR_DOMAIN, toConnectError, VmenvError } from "@vmenv/rpc";
import type { OperationRecord, OperationState } from "./operations.js";

const states: Record<OperationState, StatePb> = {
  pending: StatePb.PENDING,
  running: StatePb.RUNNING,
  succeeded: StatePb.SUCCEEDED,
  failed: StatePb.FAILED,
  cancelled: StatePb.CANCELLED,
};

export function fromPbOperationState(s: StatePb): OperationState | undefined {
  return (Object.keys(states) as OperationState[]).find((k) => states[k] === s);
}

/** An operation's error as google.rpc.Status: its code, message and ErrorInfo; unknown errors are INTERNAL. */
export function toStatus(err: Error) {
  const ce =
    err instanceof VmenvError
      ? toConnectError(err)
      : err instanceof ConnectError
        ? err
        : new ConnectError("internal error; the agent log has the details", Code.Internal, undefined, [
            { desc: ErrorInfoSchema, value: { reason: "INTERNAL", domain: ERROR_DOMAIN } },
          ]);
  const details = ce.details.flatMap((d) =>
    "desc" in d ? [anyPack(d.desc, create(d.desc as DescMessage, d.value as MessageShape<DescMessage>))] : [],
  );
  return create(StatusSchema, { code: ce.code, message: ce.rawMessage, details });
}

/** The domain's operation → the API's; `result` packs the domain result (e.g. a Vm) when there is one. */
export function toPbOperation(op: OperationRecord, packResult: (r: unknown) => Any | undefined): Operation {
  return create(OperationSchema, {
    name: `operations/${op.id}`,
    id: op.id,
    kind: op.kind,
    target: op.target,
    state: states[op.state],
    progress: { percent: op.percent, stage: op.stage },
    mayCancel: op.mayCancel,
    createTime: timestampFromMs(op.createTimeMs),
    startTime: op.startTimeMs === undefined ? undefined : timestampFromMs(op.startTimeMs),
    endTime: op.endTimeMs === undefined ? undefined : timestampFromMs(op.endTimeMs),
    error: op.error ? toStatus(op.error) : undefined,
    result: op.result === undefined ? undefined : packResult(op.result),
    requestId: op.requestId ?? "",
  });
}
