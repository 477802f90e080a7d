namespace PaliGemma.CpuOnly.Model;

/// <summary>
/// Which keys a query may attend in the PaliGemma prefix-LM decoder. The decoder takes its key ranges from
/// <see cref="VisibleKeys"/>; <see cref="BuildAllowed"/> spells the same rule out as a [query, key] matrix for checks.
/// </summary>
public static class AttentionMask
{
    /// <summary>
    /// Keys [Start, End) query position <paramref name="query"/> may see, before padding is removed. Global layers
    /// (<paramref name="window"/> 0): the whole prefix bidirectionally, later tokens causally, so End = max(prefixLength,
    /// query + 1) and Start = 0. Sliding layers (Gemma 2) also drop keys j &lt;= query − window: the window limits only the
    /// past, and later prefix keys stay visible.
    /// </summary>
    public static (int Start, int End) VisibleKeys(int query, int prefixLength, int window)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(query);
        ArgumentOutOfRangeException.ThrowIfNegative(window);
        int end = Math.Max(prefixLength, query + 1);
        int start = window == 0 ? 0 : Math.Max(0, query - window + 1);
        return (start, end);
    }

    /// <summary>
    /// allowed[i, j] = 1 when query i may attend key j of a <paramref name="tokens"/>-long sequence: j inside
    /// <see cref="VisibleKeys"/> of i and, when <paramref name="keyValid"/> is not empty, keyValid[j] != 0 (not padding).
    /// </summary>
    public static void BuildAllowed(int tokens, int prefixLength, int window, ReadOnlySpan<byte> keyValid, Span<byte> allowed)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        if (!keyValid.IsEmpty && keyValid.Length != tokens)
            throw new ArgumentException($"keyValid holds {keyValid.Length} entries for {tokens} tokens", nameof(keyValid));
        if (allowed.Length != tokens * tokens)
            throw new ArgumentException($"allowed holds {allowed.Length} entries; {tokens} x {tokens} needed", nameof(allowed));
        allowed.Clear();
        for (int i = 0; i < tokens; i++)
        {
            var (start, end) = VisibleKeys(i, prefixLength, window);
            end = Math.Min(end, tokens);
            for (int j = start; j < end; j++)
                allowed[i * tokens + j] = keyValid.IsEmpty || keyValid[j] != 0 ? (byte)1 : (byte)0;
        }
    }
}
