import { setTimeout as delay } from "node:timers/promises";
import { EchoService } from "@vmenv/api/testing/v1";
import { bind, type ServiceBinding } from "./server.js";

/** The echo service: the cheapest handler the stack can run, for kit tests and the RPC benchmark. */
export function echoService(): ServiceBinding {
  return bind(EchoService, {
    async echo(req, ctx) {
      if (req.delayMs > 0) await delay(req.delayMs, undefined, { signal: ctx.signal });
      return { message: req.message };
    },
    async *echoStream(req, ctx) {
      for (let sequence = 0; req.count === 0 || sequence < req.count; sequence++) {
        if (sequence > 0 && req.intervalMs > 0)
          await delay(req.intervalMs, undefined, { signal: ctx.signal });
        yield { message: req.message, sequence };
      }
    },
  });
}

export { EchoService };
