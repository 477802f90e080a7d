namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// Reads, from a GIF's headers, the colour that PIL gives to pixels that the first frame leaves transparent or does not
/// cover. PIL keeps frame 0 as palette indices: transparent pixels keep their index and uncovered pixels get the
/// transparent index (or 0 when there is none), so convert("RGB") shows that palette entry. ImageSharp leaves those
/// pixels as transparent black (or, without a transparent index, opaque black outside the frame) instead.
/// </summary>
internal static class GifFirstFrame
{
    /// <summary>
    /// Reads the first frame's rectangle on the logical screen and the RGB colour of its palette entry
    /// (transparent index ?? 0); null if the headers cannot be read.
    /// </summary>
    public static Info? Read(ReadOnlySpan<byte> gif)
    {
        // Header (6) and logical screen descriptor (7).
        if (gif.Length < 13)
        {
            return null;
        }

        int position = 13;
        ReadOnlySpan<byte> globalTable = default;
        if ((gif[10] & 0x80) != 0)
        {
            int length = 3 << ((gif[10] & 7) + 1);
            if (gif.Length < position + length)
            {
                return null;
            }

            globalTable = gif.Slice(position, length);
            position += length;
        }

        int? transparentIndex = null;
        while (position < gif.Length)
        {
            byte introducer = gif[position++];
            if (introducer == 0x21 && position < gif.Length)
            {
                // Extension: the graphic control extension (F9) before the first image holds its transparent index.
                byte label = gif[position++];
                if (label == 0xF9 && position + 5 <= gif.Length && gif[position] >= 4 && (gif[position + 1] & 1) != 0)
                {
                    transparentIndex = gif[position + 4];
                }

                if (!SkipSubBlocks(gif, ref position))
                {
                    return null;
                }
            }
            else if (introducer == 0x2C && position + 9 <= gif.Length)
            {
                // First image descriptor: its local colour table, if any, replaces the global one.
                byte flags = gif[position + 8];
                ReadOnlySpan<byte> table = globalTable;
                if ((flags & 0x80) != 0)
                {
                    int length = 3 << ((flags & 7) + 1);
                    int start = position + 9;
                    if (gif.Length < start + length)
                    {
                        return null;
                    }

                    table = gif.Slice(start, length);
                }

                int index = transparentIndex ?? 0;
                var info = new Info
                {
                    Left = gif[position] | gif[position + 1] << 8,
                    Top = gif[position + 2] | gif[position + 3] << 8,
                    Width = gif[position + 4] | gif[position + 5] << 8,
                    Height = gif[position + 6] | gif[position + 7] << 8,
                };
                if (table.IsEmpty)
                {
                    (info.Red, info.Green, info.Blue) = ((byte)index, (byte)index, (byte)index); // PIL reads a GIF without palettes as greyscale
                }
                else if (3 * index + 2 < table.Length)
                {
                    (info.Red, info.Green, info.Blue) = (table[3 * index], table[3 * index + 1], table[3 * index + 2]);
                }

                return info;
            }
            else
            {
                return null; // trailer or garbage before any image
            }
        }

        return null;
    }

    private static bool SkipSubBlocks(ReadOnlySpan<byte> gif, ref int position)
    {
        while (position < gif.Length)
        {
            int size = gif[position++];
            if (size == 0)
            {
                return true;
            }

            position += size;
        }

        return false;
    }

    /// <summary>The first frame's rectangle and the colour PIL shows where that frame is transparent or absent.</summary>
    internal sealed class Info
    {
        public int Left { get; init; }
        public int Top { get; init; }
        public int Width { get; init; }
        public int Height { get; init; }
        public byte Red { get; set; }
        public byte Green { get; set; }
        public byte Blue { get; set; }

        public bool Covers(int x, int y) => x >= Left && x - Left < Width && y >= Top && y - Top < Height;
    }
}
