/** Left-aligned text columns for human output; `-` stands for an empty cell. */
export function table(headers: readonly string[], rows: readonly (readonly (string | null | undefined)[])[]): string[] {
  const cells = rows.map((row) => headers.map((_, i) => row[i] ?? '-'));
  const widths = headers.map((header, i) => Math.max(header.length, ...cells.map((row) => row[i]!.length)));
  const line = (values: readonly string[]) => values.map((value, i) => (i === values.length - 1 ? value : value.padEnd(widths[i]!))).join('  ');
  return [line(headers), ...cells.map(line)];
}
