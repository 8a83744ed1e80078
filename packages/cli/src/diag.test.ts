import { LogLevel } from "@vmenv/api/agent/v1";
import { describe, expect, it } from "vitest";
import { opName, parseLevel, parseSince } from "./diag.js";

describe("vmenv logs / errors arguments", () => {
  it("read relative and absolute times, levels and operation ids, and refuse what they are not", () => {
    const now = Date.parse("2026-01-31T12:00:00Z");
    expect(parseSince("10m", now)).toBe(now - 600_000);
    expect(parseSince("2h", now)).toBe(now - 7_200_000);
    expect(parseSince("2026-01-31T11:00:00Z", now)).toBe(now - 3_600_000);
    expect(() => parseSince("yesterday", now)).toThrow(/not a time/);
    expect(parseLevel("WARN")).toBe(LogLevel.WARN);
    expect(() => parseLevel("loud")).toThrow(/debug, info, warn or error/);
    expect(opName("abc-1")).toBe("operations/abc-1");
    expect(opName("operations/abc-1")).toBe("operations/abc-1");
  });
});
