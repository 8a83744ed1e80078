import { DiagnosticsService } from "@vmenv/api/agent/v1";
import { bind, invalidArgument, type ServiceBinding, unimplemented } from "@vmenv/rpc";
import { fromPbOperationState, toPbOperation } from "./convert.js";
import type { Operations } from "./operations.js";

type Pack = Parameters<typeof toPbOperation>[1];

/** `operations/{id}` → id. */
export function operationId(name: string, field = "name"): string {
  const m = /^operations\/([A-Za-z0-9._-]{1,100})$/.exec(name);
  if (!m?.[1])
    throw invalidArgument(field, `"${name.slice(0, 80)}" is not an operation name (operations/{operation})`);
  return m[1];
}

/** DiagnosticsService: operations now; statistics, errors and logs arrive with issue #5. */
export function diagnosticsService(ops: Operations, pack: Pack): ServiceBinding {
  const later = (m: string) => () => {
    throw unimplemented(`vmenv.agent.v1.DiagnosticsService/${m}`, "arrives with issue #5");
  };
  return bind(DiagnosticsService, {
    getOperation(req) {
      return toPbOperation(ops.get(operationId(req.name)), pack);
    },
    async waitOperation(req, ctx) {
      const ms = req.timeout ? Number(req.timeout.seconds) * 1000 + req.timeout.nanos / 1e6 : 60_000;
      return toPbOperation(await ops.wait(operationId(req.name), Math.min(ms, 600_000), ctx.signal), pack);
    },
    cancelOperation(req) {
      return toPbOperation(ops.cancel(operationId(req.name)), pack);
    },
    listOperations(req) {
      if (req.filter)
        throw invalidArgument(
          "filter",
          "filter expressions are not supported yet; use states, kind and target",
        );
      const states = new Set(req.states.map(fromPbOperationState));
      const all = ops
        .list()
        .filter((o) => (states.size === 0 || states.has(o.state)) && (!req.kind || o.kind === req.kind))
        .filter(
          (o) =>
            (!req.target || o.target === req.target) && (!req.requestId || o.requestId === req.requestId),
        )
        .sort((a, b) => b.createTimeMs - a.createTimeMs || b.id.localeCompare(a.id));
      const size = req.pageSize > 0 ? Math.min(req.pageSize, 1000) : 100;
      const start = req.pageToken ? Number(Buffer.from(req.pageToken, "base64url").toString()) : 0;
      if (!Number.isInteger(start) || start < 0)
        throw invalidArgument("page_token", "is not a token this agent gave");
      const page = all.slice(start, start + size);
      return {
        operations: page.map((o) => toPbOperation(o, pack)),
        nextPageToken:
          start + size < all.length ? Buffer.from(String(start + size)).toString("base64url") : "",
      };
    },
    watchOperations: later("WatchOperations"),
    getStatistics: later("GetStatistics"),
    watchStatistics: later("WatchStatistics"),
    listErrors: later("ListErrors"),
    streamLogs: later("StreamLogs"),
  });
}
