import { describe, expect, it } from "vitest";
import { bytes, cpuList, duration, keyValues, table } from "./output.js";

describe("output formatting", () => {
  it("formats sizes, durations and CPU lists the way a reader expects", () => {
    expect(bytes(512)).toBe("512 B");
    expect(bytes(25769803776n)).toBe("24.0 GiB");
    expect(duration(93784.2)).toBe("1d 2h 3m 4s");
    expect(duration(59)).toBe("59s");
    expect(cpuList([0, 1, 2, 3, 8, 9, 11])).toBe("0-3,8-9,11");
    expect(cpuList([])).toBe("");
  });
  it("aligns key/value lines and table columns", () => {
    expect(
      keyValues([
        ["a", "1"],
        ["long key", "2"],
      ]),
    ).toBe("a:        1\nlong key: 2");
    expect(
      table(
        ["ID", "NAME"],
        [
          ["1", "x"],
          ["10", "yy"],
        ],
      ),
    ).toBe("ID  NAME\n1   x\n10  yy");
  });
});
