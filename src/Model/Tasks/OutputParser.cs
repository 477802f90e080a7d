namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>
/// Parses detect/segment outputs into objects, following the grammar of tests/golden/segmentation/parse_cases.json:
/// <c>object := LOC LOC LOC LOC [ws] [SEG x 16] [ws] label [';']</c>. Tokens are <c>&lt;locDDDD&gt;</c> (4 digits) and
/// <c>&lt;segDDD&gt;</c> (3 digits); a run is a maximal sequence of same-kind tokens, whitespace allowed between them. An object
/// is kept only with exactly 4 locs in 0..1023, y2 &gt; y1, x2 &gt; x1, and no seg run or exactly 16 segs in 0..127; other
/// objects are skipped with their label, and text outside objects is ignored. Never throws on any text.
/// </summary>
public static class OutputParser
{

    /// <exception cref="ArgumentOutOfRangeException">A dimension is not positive.</exception>
    public static IReadOnlyList<DetectedObject> Parse(string raw, int imageWidth, int imageHeight)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageWidth);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageHeight);
        var objects = new List<DetectedObject>();
        if (string.IsNullOrEmpty(raw)) return objects;
        var text = raw.AsSpan();
        Span<int> locs = stackalloc int[5];
        Span<int> segs = stackalloc int[17];
        int pos = 0;
        while (true)
        {
            int start = NextLoc(text, pos);
            if (start < 0) break;
            pos = start;

            // The loc run; counts past 4 are only needed to tell "too many" from "exactly 4".
            int locCount = ReadRun(text, ref pos, "<loc", 4, locs, out bool locInRange);
            int afterLocs = pos;
            int segCount = ReadRun(text, ref pos, "<seg", 3, segs, out bool segInRange);
            if (segCount == 0) pos = afterLocs;

            // Label: up to ';', '<', '>' or the end.
            int labelEnd = text[pos..].IndexOfAny(';', '<', '>');
            labelEnd = labelEnd < 0 ? text.Length : pos + labelEnd;
            string label = text[pos..labelEnd].Trim().ToString();
            pos = labelEnd < text.Length && text[labelEnd] == ';' ? labelEnd + 1 : labelEnd;

            bool valid = locCount == 4 && locInRange && locs[2] > locs[0] && locs[3] > locs[1]
                         && (segCount == 0 || (segCount == 16 && segInRange));
            if (!valid) continue;
            int[]? seg = segCount == 16 ? segs[..16].ToArray() : null;
            objects.Add(new DetectedObject(label, locs[..4].ToArray(), seg, imageWidth, imageHeight));
        }
        return objects;
    }

    /// <summary>Index of the next well-formed loc token at or after <paramref name="from"/>, or -1.</summary>
    private static int NextLoc(ReadOnlySpan<char> text, int from)
    {
        while (from < text.Length)
        {
            int i = text[from..].IndexOf("<loc", StringComparison.Ordinal);
            if (i < 0) return -1;
            i += from;
            if (TryToken(text, i, "<loc", 4, out _)) return i;
            from = i + 1;
        }
        return -1;
    }

    /// <summary>
    /// Reads a maximal run of <paramref name="prefix"/> tokens starting at <paramref name="pos"/> (leading whitespace
    /// allowed), storing the first values in <paramref name="values"/>. Leaves <paramref name="pos"/> after the last token.
    /// </summary>
    private static int ReadRun(ReadOnlySpan<char> text, ref int pos, string prefix, int digits, Span<int> values, out bool inRange)
    {
        int count = 0, max = prefix == "<loc" ? 1023 : 127;
        inRange = true;
        int cursor = pos;
        while (true)
        {
            int next = cursor;
            while (next < text.Length && char.IsWhiteSpace(text[next])) next++;
            if (!TryToken(text, next, prefix, digits, out int value)) break;
            if (count < values.Length) values[count] = value;
            inRange &= value <= max;
            count++;
            cursor = next + prefix.Length + digits + 1;
            pos = cursor;
        }
        return count;
    }

    private static bool TryToken(ReadOnlySpan<char> text, int at, string prefix, int digits, out int value)
    {
        value = 0;
        int length = prefix.Length + digits + 1;
        if (at + length > text.Length || !text.Slice(at, prefix.Length).SequenceEqual(prefix) || text[at + length - 1] != '>') return false;
        for (int i = 0; i < digits; i++)
        {
            char c = text[at + prefix.Length + i];
            if (!char.IsAsciiDigit(c)) return false;
            value = value * 10 + (c - '0');
        }
        return true;
    }
}
