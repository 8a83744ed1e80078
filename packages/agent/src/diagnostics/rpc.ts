import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { DiagnosticsService, type Operation, WatchEventType } from "@vmenv/api/agent/v1";
import { bind, invalidArgument, type ServiceBinding, sleep, unimplemented, VmenvError } from "@vmenv/rpc";
import { vmIdFromName } from "../vmm/domain.js";
import {
  fromPbLogLevel,
  fromPbOperationState,
  toPbErrorRecord,
  toPbLogEntry,
  toPbOperation,
  toPbStatistics,
} from "./convert.js";
import type { ErrorLog } from "./errors.js";
import { type LogFilter, type LogRecord, type LogRing, matchesLog } from "./logs.js";
import type { OperationChange, OperationRecord, OperationState, Operations } from "./operations.js";
import type { StatsSampler } from "./stats.js";
import { changeSourceOf, WATCH_QUEUE, watchChanges } from "./watch.js";

type Pack = Parameters<typeof toPbOperation>[1];

/** `operations/{id}` → id. */
export function operationId(name: string, field = "name"): string {
  const m = /^operations\/([A-Za-z0-9._-]{1,100})$/.exec(name);
  if (!m?.[1])
    throw invalidArgument(field, `"${name.slice(0, 80)}" is not an operation name (operations/{operation})`);
  return m[1];
}

export interface DiagnosticsDeps {
  operations: Operations;
  /** Packs an operation's result (a Vm, a Volume …) for the API. */
  pack: Pack;
  errors?: ErrorLog;
  logs?: LogRing;
  stats?: StatsSampler;
  /** Throws NOT_FOUND for a VM id the agent does not know. */
  checkVm?: (id: string) => void;
}

const durationMs = (d: { seconds: bigint; nanos: number } | undefined) =>
  d ? Number(d.seconds) * 1000 + d.nanos / 1e6 : undefined;

/** Page of a newest-first list: offset tokens, as ListOperations has always given them. */
function pageOf<T>(all: T[], pageSize: number, pageToken: string): { items: T[]; next: string } {
  const size = pageSize > 0 ? Math.min(pageSize, 1000) : 100;
  const start = pageToken ? Number(Buffer.from(pageToken, "base64url").toString()) : 0;
  if (!Number.isInteger(start) || start < 0)
    throw invalidArgument("page_token", "is not a token this agent gave");
  return {
    items: all.slice(start, start + size),
    next: start + size < all.length ? Buffer.from(String(start + size)).toString("base64url") : "",
  };
}

const noFilterExpr = (filter: string, use: string) => {
  if (filter) throw invalidArgument("filter", `filter expressions are not supported yet; use ${use}`);
};

/** DiagnosticsService: operations, statistics, errors and logs of this agent. */
export function diagnosticsService(d: DiagnosticsDeps): ServiceBinding {
  const ops = d.operations;
  const missing = (what: string) => () => {
    throw unimplemented(`vmenv.agent.v1.DiagnosticsService/${what}`, "this agent was built without it");
  };
  const op = (o: OperationRecord): Operation => toPbOperation(o, d.pack);
  const vmIds = (names: string[]) =>
    names.map((n, i) => {
      const id = vmIdFromName(n, `vms[${i}]`);
      d.checkVm?.(id);
      return id;
    });

  return bind(DiagnosticsService, {
    getOperation(req) {
      return op(ops.get(operationId(req.name)));
    },
    async waitOperation(req, ctx) {
      const ms = durationMs(req.timeout) ?? 60_000;
      return op(await ops.wait(operationId(req.name), Math.min(ms, 600_000), ctx.signal));
    },
    cancelOperation(req) {
      return op(ops.cancel(operationId(req.name)));
    },
    listOperations(req) {
      noFilterExpr(req.filter, "states, kind and target");
      const states = new Set(req.states.map(fromPbOperationState));
      const all = ops
        .list()
        .filter((o) => (states.size === 0 || states.has(o.state)) && (!req.kind || o.kind === req.kind))
        .filter(
          (o) =>
            (!req.target || o.target === req.target) && (!req.requestId || o.requestId === req.requestId),
        )
        .sort((a, b) => b.createTimeMs - a.createTimeMs || b.id.localeCompare(a.id));
      const p = pageOf(all, req.pageSize, req.pageToken);
      return { operations: p.items.map(op), nextPageToken: p.next };
    },
    async *watchOperations(req, ctx) {
      noFilterExpr(req.filter, "states, kind and target");
      const states = new Set(
        req.states.map(fromPbOperationState).filter((s): s is OperationState => s !== undefined),
      );
      const matches = (o: OperationRecord) =>
        (states.size === 0 || states.has(o.state)) &&
        (!req.kind || o.kind === req.kind) &&
        (!req.target || o.target === req.target);
      const event = (type: WatchEventType, o: OperationRecord | undefined, seq: number, timeMs: number) => ({
        type,
        ...(o ? { operation: op(o) } : {}),
        resumeToken: String(seq),
        eventTime: timestampFromMs(timeMs),
      });
      const types = {
        created: WatchEventType.CREATED,
        updated: WatchEventType.UPDATED,
        deleted: WatchEventType.DELETED,
      } as const;
      yield* watchChanges<OperationChange, ReturnType<typeof event>>(changeSourceOf(ops), {
        resumeToken: req.resumeToken,
        signal: ctx.signal,
        snapshot: function* (seq) {
          const now = Date.now();
          // With no states asked for, the snapshot holds the unfinished operations only.
          for (const o of ops.list())
            if (matches(o) && (states.size > 0 || o.endTimeMs === undefined))
              yield event(WatchEventType.INITIAL, o, seq, now);
          yield event(WatchEventType.SYNCED, undefined, seq, now);
        },
        toEvent: (c) => (matches(c.op) ? event(types[c.type], c.op, c.seq, c.timeMs) : undefined),
      });
    },
    getStatistics: d.stats
      ? async (req) => {
          const sampler = d.stats as StatsSampler;
          const ids = req.vms.length > 0 ? vmIds(req.vms) : undefined;
          return toPbStatistics(await sampler.sample(ids));
        }
      : missing("GetStatistics"),
    watchStatistics: d.stats
      ? async function* (req, ctx) {
          const sampler = d.stats as StatsSampler;
          const ids = req.vms.length > 0 ? vmIds(req.vms) : undefined;
          const interval = durationMs(req.interval) ?? 5000;
          if (interval < 1000) throw invalidArgument("interval", "must be at least 1 second");
          // One sample per interval, taken when the client can take it: a slow client slows its own
          // stream, nothing queues up.
          while (!ctx.signal.aborted) {
            const started = Date.now();
            yield toPbStatistics(await sampler.sample(ids));
            await sleep(Math.max(0, interval - (Date.now() - started)), ctx.signal);
          }
        }
      : missing("WatchStatistics"),
    listErrors: d.errors
      ? (req) => {
          noFilterExpr(req.filter, "start_time, end_time, reasons, target and operation");
          if (req.operation) operationId(req.operation, "operation");
          const all = (d.errors as ErrorLog).list({
            ...(req.startTime ? { startMs: timestampMs(req.startTime) } : {}),
            ...(req.endTime ? { endMs: timestampMs(req.endTime) } : {}),
            reasons: req.reasons,
            target: req.target,
            operation: req.operation,
          });
          const p = pageOf(all, req.pageSize, req.pageToken);
          return { errors: p.items.map(toPbErrorRecord), nextPageToken: p.next };
        }
      : missing("ListErrors"),
    streamLogs: d.logs
      ? async function* (req, ctx) {
          const ring = d.logs as LogRing;
          if (req.operation) operationId(req.operation, "operation");
          const f: LogFilter = {
            minLevel: req.minLevel ? fromPbLogLevel(req.minLevel) : "info",
            operation: req.operation,
            target: req.target,
          };
          const sinceMs = req.since ? timestampMs(req.since) : undefined;
          const last = req.lastEntries > 0 ? req.lastEntries : sinceMs === undefined ? 100 : 0;
          // Subscribe before the replay, so that nothing logged in between is lost.
          const queue: LogRecord[] = [];
          let wake: (() => void) | undefined;
          let overflow = false;
          const onEntry = (r: LogRecord) => {
            if (!matchesLog(r, f)) return;
            if (queue.length >= WATCH_QUEUE * 4) overflow = true;
            else queue.push(r);
            wake?.();
          };
          if (req.follow) ring.on("entry", onEntry);
          const aborted = new Promise<void>((r) =>
            ctx.signal.addEventListener("abort", () => r(), { once: true }),
          );
          try {
            let seen = 0;
            for (const r of ring.replay(f, { ...(sinceMs !== undefined ? { sinceMs } : {}), last })) {
              seen = r.seq;
              yield toPbLogEntry(r);
            }
            while (req.follow && !ctx.signal.aborted) {
              if (overflow) {
                throw new VmenvError(
                  "resource-exhausted",
                  "log follower fell too far behind and was cut off; stream again with since",
                  { reason: "WATCH_CLIENT_TOO_SLOW" },
                );
              }
              const r = queue.shift();
              if (!r) {
                await Promise.race([new Promise<void>((res) => (wake = res)), aborted]);
                continue;
              }
              if (r.seq <= seen) continue;
              seen = r.seq;
              yield toPbLogEntry(r);
            }
          } finally {
            ring.off("entry", onEntry);
          }
        }
      : missing("StreamLogs"),
  });
}
