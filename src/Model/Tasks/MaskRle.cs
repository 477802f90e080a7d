namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>
/// COCO-style uncompressed run-length encoding of a binary mask: pixels in column-major order (down each column, then
/// the next column, as pycocotools), counts alternate zeros and ones starting with zeros (the first count may be 0).
/// </summary>
public static class MaskRle
{
    /// <param name="mask">[height * width] row-major, nonzero = object.</param>
    public static int[] Encode(ReadOnlySpan<byte> mask, int width, int height)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        if (mask.Length != width * height)
            throw new ArgumentException($"the mask holds {mask.Length} bytes, a {width}x{height} mask needs {width * height}", nameof(mask));
        var counts = new List<int>();
        bool current = false;
        int run = 0;
        for (int x = 0; x < width; x++)
        {
            for (int y = 0; y < height; y++)
            {
                bool on = mask[y * width + x] != 0;
                if (on != current)
                {
                    counts.Add(run);
                    run = 0;
                    current = on;
                }
                run++;
            }
        }
        counts.Add(run);
        return [.. counts];
    }

    /// <summary>Inverse of <see cref="Encode"/>: a row-major [height * width] 0/1 mask.</summary>
    public static byte[] Decode(ReadOnlySpan<int> counts, int width, int height)
    {
        var mask = new byte[width * height];
        int index = 0;
        byte value = 0;
        foreach (int count in counts)
        {
            if (count < 0 || index + count > mask.Length) throw new ArgumentException("the counts do not fit the mask size", nameof(counts));
            for (int k = 0; k < count; k++, index++)
            {
                int x = index / height, y = index % height;
                mask[y * width + x] = value;
            }
            value ^= 1;
        }
        if (index != mask.Length) throw new ArgumentException($"the counts cover {index} pixels, the mask has {mask.Length}", nameof(counts));
        return mask;
    }
}
