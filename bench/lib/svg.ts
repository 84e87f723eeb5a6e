// Small SVG charts for the benchmarks, written by hand (no dependency): horizontal bars with an aim marker.

export interface Bar {
  label: string;
  value: number;
  /** Drawn as a dashed line across the bar's lane. */
  aim?: number;
}

function escapeXml(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

export function barChartSvg(chart: { title: string; bars: Bar[] }): string {
  const width = 720;
  const left = 300;
  const lane = 36;
  const top = 40;
  const height = top + chart.bars.length * lane + 30;
  const max = Math.max(1, ...chart.bars.flatMap((bar) => [bar.value, bar.aim ?? 0])) * 1.1;
  const x = (value: number) => left + (value / max) * (width - left - 60);
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="13">`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="10" y="22" font-size="15" font-weight="bold">${escapeXml(chart.title)}</text>`,
  ];
  chart.bars.forEach((bar, i) => {
    const y = top + i * lane;
    parts.push(`<text x="10" y="${y + 20}">${escapeXml(bar.label)}</text>`);
    parts.push(`<rect x="${left}" y="${y + 6}" width="${x(bar.value) - left}" height="${lane - 14}" fill="#4c78a8"/>`);
    parts.push(`<text x="${x(bar.value) + 6}" y="${y + 20}">${bar.value.toFixed(2)}×</text>`);
    if (bar.aim !== undefined) {
      parts.push(
        `<line x1="${x(bar.aim)}" x2="${x(bar.aim)}" y1="${y + 2}" y2="${y + lane - 4}" stroke="#e45756" stroke-width="2" stroke-dasharray="4 3"/>`,
      );
    }
  });
  const axis = top + chart.bars.length * lane + 4;
  parts.push(`<line x1="${x(1)}" x2="${x(1)}" y1="${top}" y2="${axis}" stroke="#888"/>`);
  parts.push(`<text x="${x(1) - 10}" y="${axis + 16}" fill="#555">1×</text>`);
  parts.push(`<text x="${width - 200}" y="${axis + 16}" fill="#e45756">dashed: aim</text>`);
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}
