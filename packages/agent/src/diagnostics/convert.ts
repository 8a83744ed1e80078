import { create, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { type Any, anyPack, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type ErrorRecord,
  ErrorRecordSchema,
  type LogEntry,
  LogEntrySchema,
  LogLevel as LogLevelPb,
  type Operation,
  OperationSchema,
  OperationState as StatePb,
  type Statistics,
  StatisticsSchema,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema, StatusSchema } from "@vmenv/api/google/rpc";
import { ERROR_DOMAIN, toConnectError, VmenvError } from "@vmenv/rpc";
import type { ErrorEntry } from "./errors.js";
import type { LogRecord, LogSeverity } from "./logs.js";
import type { OperationRecord, OperationState } from "./operations.js";
import type { StatsSample } from "./stats.js";

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
    metadata: op.metadata === undefined ? undefined : packResult(op.metadata),
    requestId: op.requestId ?? "",
  });
}

/** Nanoseconds → google.protobuf.Duration. */
export function nsDuration(ns: number) {
  const n = Math.max(0, Math.round(ns));
  return { seconds: BigInt(Math.floor(n / 1e9)), nanos: n % 1e9 };
}

const u64 = (n: number) => BigInt(Math.max(0, Math.round(n)));

/** A statistics sample → Statistics. */
export function toPbStatistics(s: StatsSample): Statistics {
  const h = s.host;
  return create(StatisticsSchema, {
    sampleTime: timestampFromMs(s.timeMs),
    host: {
      cpu: {
        user: nsDuration(h.cpu.user),
        system: nsDuration(h.cpu.system),
        idle: nsDuration(h.cpu.idle),
        iowait: nsDuration(h.cpu.iowait),
        steal: nsDuration(h.cpu.steal),
      },
      loadAverage1m: h.load[0],
      loadAverage5m: h.load[1],
      loadAverage15m: h.load[2],
      memory: {
        totalBytes: u64(h.memory.totalBytes),
        availableBytes: u64(h.memory.availableBytes),
        freeBytes: u64(h.memory.freeBytes),
      },
      runningVms: h.runningVms,
    },
    vms: s.vms.map((v) => ({
      vm: `vms/${v.id}`,
      cpuTime: nsDuration(v.cpuTimeNs),
      vcpus: v.vcpus.map((c) => ({
        index: c.index,
        cpuTime: nsDuration(c.cpuTimeNs),
        waitTime: nsDuration(c.waitTimeNs),
        hostCpu: c.hostCpu,
      })),
      memoryBytes: v.memoryBytes,
      memoryRssBytes: u64(v.rssBytes),
      ...(v.balloon
        ? {
            balloon: {
              actualBytes: u64(v.balloon.actualBytes),
              guestFreeBytes: u64(v.balloon.freeBytes ?? 0),
              guestAvailableBytes: u64(v.balloon.availableBytes ?? 0),
              guestTotalBytes: u64(v.balloon.totalBytes ?? 0),
            },
          }
        : {}),
      disks: v.disks.map((d) => ({
        deviceId: d.deviceId,
        volume: d.volume,
        readBytes: u64(d.readBytes),
        writeBytes: u64(d.writeBytes),
        readOps: u64(d.readOps),
        writeOps: u64(d.writeOps),
        flushOps: u64(d.flushOps),
        readTime: nsDuration(d.readTimeNs),
        writeTime: nsDuration(d.writeTimeNs),
      })),
      nics: v.nics.map((n) => ({
        deviceId: n.deviceId,
        tapName: n.tap,
        rxBytes: u64(n.rxBytes),
        txBytes: u64(n.txBytes),
        rxPackets: u64(n.rxPackets),
        txPackets: u64(n.txPackets),
        rxDropped: u64(n.rxDropped),
        txDropped: u64(n.txDropped),
        errors: u64(n.errors),
      })),
    })),
  });
}

/** An error record → ErrorRecord. */
export function toPbErrorRecord(e: ErrorEntry): ErrorRecord {
  return create(ErrorRecordSchema, {
    id: e.id,
    time: timestampFromMs(e.timeMs),
    reason: e.reason,
    message: e.message,
    target: e.target,
    element: e.element,
    operation: e.operation,
    status: toStatus(e.error),
  });
}

const levels: Record<LogSeverity, LogLevelPb> = {
  debug: LogLevelPb.DEBUG,
  info: LogLevelPb.INFO,
  warn: LogLevelPb.WARN,
  error: LogLevelPb.ERROR,
};

export function fromPbLogLevel(l: LogLevelPb): LogSeverity {
  return (Object.keys(levels) as LogSeverity[]).find((k) => levels[k] === l) ?? "info";
}

/** A log line → LogEntry. */
export function toPbLogEntry(r: LogRecord): LogEntry {
  return create(LogEntrySchema, {
    time: timestampFromMs(r.timeMs),
    level: levels[r.level],
    component: r.component,
    message: r.message,
    operation: r.operation,
    target: r.target,
    attributes: r.attributes,
  });
}
