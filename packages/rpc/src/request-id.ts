import { randomUUID } from "node:crypto";
import { type ContextValues, createContextKey, type Interceptor } from "@connectrpc/connect";

/** Header carrying the request id, in requests (optional) and responses (always). */
export const REQUEST_ID_HEADER = "x-request-id";

const requestIdKey = createContextKey<string | undefined>(undefined, { description: "request id" });

/** The request id of the call whose context values these are. */
export function requestIdOf(values: ContextValues): string | undefined {
  return values.get(requestIdKey);
}

const validId = /^[A-Za-z0-9._:-]{1,128}$/;

/**
 * Gives every call a request id: the caller's `x-request-id` when it is well formed, a fresh UUID
 * otherwise. The id is echoed in the response header, logged, and quoted in INTERNAL errors.
 */
export function requestIdInterceptor(newId: () => string = randomUUID): Interceptor {
  return (next) => async (req) => {
    const given = req.header.get(REQUEST_ID_HEADER);
    const id = given && validId.test(given) ? given : newId();
    req.contextValues.set(requestIdKey, id);
    const res = await next(req);
    res.header.set(REQUEST_ID_HEADER, id);
    return res;
  };
}
