import { invalidArgument } from "./errors.js";

/**
 * One page of `all` for a List call (AIP-158): items sorted by `key` after the key the token names.
 * The token is the last key of the previous page, base64url-encoded; page_size 0 means 100, at most 1000.
 */
export function page<T>(all: readonly T[], key: (t: T) => string, pageSize: number, pageToken: string) {
  if (pageSize < 0) throw invalidArgument("page_size", "must not be negative");
  const after = pageToken ? Buffer.from(pageToken, "base64url").toString() : "";
  const size = pageSize > 0 ? Math.min(pageSize, 1000) : 100;
  const rest = all
    .filter((t) => key(t) > after)
    .sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
  const items = rest.slice(0, size);
  const last = items[items.length - 1];
  return { items, next: rest.length > size && last ? Buffer.from(key(last)).toString("base64url") : "" };
}

/** AIP-160 filter expressions are not supported yet: a List with one is refused, not silently unfiltered. */
export function noFilter(filter: string, hint = "use the typed fields"): void {
  if (filter) throw invalidArgument("filter", `filter expressions are not supported yet; ${hint}`);
}
