namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>A JPEG Huffman table (ITU T.81 annex C), with a lookup for short codes and canonical limits for long ones.</summary>
internal sealed class JpegHuffmanTable
{
    /// <summary>Codes up to this many bits decode with one table look-up.</summary>
    public const int LookupBits = 9;

    /// <summary>Indexed by the next <see cref="LookupBits"/> bits: (code length &lt;&lt; 8) | symbol, or 0 for a longer code.</summary>
    public readonly ushort[] Lookup = new ushort[1 << LookupBits];

    /// <summary>Largest code of each length (index 1..16), or -1 when there is none.</summary>
    public readonly int[] MaxCode = new int[18];

    /// <summary>Index into <see cref="Symbols"/> of a code of each length, minus that code.</summary>
    public readonly int[] SymbolOffset = new int[18];

    public readonly byte[] Symbols;

    /// <param name="codeCounts">Number of codes of each length 1..16 (index 0 is length 1).</param>
    /// <param name="symbols">The symbols in code order.</param>
    public JpegHuffmanTable(ReadOnlySpan<byte> codeCounts, ReadOnlySpan<byte> symbols)
    {
        Symbols = symbols.ToArray();
        int code = 0;
        int index = 0;
        for (int length = 1; length <= 16; length++)
        {
            int count = codeCounts[length - 1];
            SymbolOffset[length] = index - code;
            for (int i = 0; i < count; i++, index++, code++)
            {
                if (length <= LookupBits)
                {
                    int shift = LookupBits - length;
                    int first = code << shift;
                    Lookup.AsSpan(first, 1 << shift).Fill((ushort)((length << 8) | Symbols[index]));
                }
            }

            MaxCode[length] = count > 0 ? code - 1 : -1;
            // Canonical codes of one length must fit in that many bits.
            if (code > 1 << length)
            {
                throw new InvalidDataException("a JPEG Huffman table assigns more codes than its code lengths allow.");
            }

            code <<= 1;
        }

        MaxCode[17] = int.MaxValue; // sentinel; decoding stops at 16 bits before reaching it
    }
}
