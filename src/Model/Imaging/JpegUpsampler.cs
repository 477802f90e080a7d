namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// libjpeg-turbo's default chroma upsampling ("fancy", do_fancy_upsampling = TRUE) and its fixed-point YCbCr to RGB
/// conversion, one output row at a time.
/// </summary>
/// <remarks>
/// Doubling horizontally, vertically or both uses a triangular filter (3/4 of the nearer sample, 1/4 of the farther)
/// with libjpeg's alternating rounding biases; other integral ratios, and rows of at most two samples when doubling
/// horizontally, replicate samples. Neighbours beyond the edges repeat the edge sample, as libjpeg's context rows and
/// end-of-row cases do.
/// </remarks>
internal static class JpegUpsampler
{
    private const int ScaleBits = 16;
    private const int OneHalf = 1 << (ScaleBits - 1);

    private static readonly int[] s_crToRed = new int[256];
    private static readonly int[] s_cbToBlue = new int[256];
    private static readonly int[] s_crToGreen = new int[256];
    private static readonly int[] s_cbToGreen = new int[256];

    static JpegUpsampler()
    {
        // libjpeg's jdcolor.c tables: FIX(x) = round(x * 2^16); chroma is centred on 128.
        static int Fix(double x) => (int)(x * (1 << ScaleBits) + 0.5);
        for (int i = 0; i < 256; i++)
        {
            int x = i - 128;
            s_crToRed[i] = (Fix(1.40200) * x + OneHalf) >> ScaleBits;
            s_cbToBlue[i] = (Fix(1.77200) * x + OneHalf) >> ScaleBits;
            s_crToGreen[i] = -Fix(0.71414) * x;
            s_cbToGreen[i] = -Fix(0.34414) * x + OneHalf;
        }
    }

    /// <summary>Writes output row <paramref name="y"/> of a component, upsampled to the image width (destination length).</summary>
    public static void UpsampleRow(PilJpegDecoder.Component component, int maxH, int maxV, int y, Span<byte> destination)
    {
        int horizontalRatio = maxH / component.H;
        int verticalRatio = maxV / component.V;
        int stride = component.SampleStride;
        int width = component.Width;
        byte[] samples = component.Samples;
        int row = y / verticalRatio;

        if (horizontalRatio == 1 && verticalRatio == 1)
        {
            samples.AsSpan(row * stride, destination.Length).CopyTo(destination);
        }
        else if (horizontalRatio == 2 && verticalRatio == 1 && width > 2)
        {
            ReadOnlySpan<byte> input = samples.AsSpan(row * stride, width);
            for (int x = 0; 2 * x < destination.Length; x++)
            {
                int nearer = input[x] * 3;
                destination[2 * x] = (byte)((nearer + input[Math.Max(x - 1, 0)] + 1) >> 2);
                if (2 * x + 1 < destination.Length)
                {
                    destination[2 * x + 1] = (byte)((nearer + input[Math.Min(x + 1, width - 1)] + 2) >> 2);
                }
            }
        }
        else if (horizontalRatio == 1 && verticalRatio == 2)
        {
            // The upper output row of each pair leans on the row above, the lower one on the row below.
            bool upper = (y & 1) == 0;
            int neighbourRow = Math.Clamp(upper ? row - 1 : row + 1, 0, component.Height - 1);
            int bias = upper ? 1 : 2;
            ReadOnlySpan<byte> input = samples.AsSpan(row * stride, width);
            ReadOnlySpan<byte> neighbour = samples.AsSpan(neighbourRow * stride, width);
            for (int x = 0; x < destination.Length; x++)
            {
                destination[x] = (byte)((input[x] * 3 + neighbour[x] + bias) >> 2);
            }
        }
        else if (horizontalRatio == 2 && verticalRatio == 2 && width > 2)
        {
            bool upper = (y & 1) == 0;
            int neighbourRow = Math.Clamp(upper ? row - 1 : row + 1, 0, component.Height - 1);
            ReadOnlySpan<byte> input = samples.AsSpan(row * stride, width);
            ReadOnlySpan<byte> neighbour = samples.AsSpan(neighbourRow * stride, width);
            for (int x = 0; 2 * x < destination.Length; x++)
            {
                int column = input[x] * 3 + neighbour[x];
                int previous = x > 0 ? input[x - 1] * 3 + neighbour[x - 1] : column;
                int next = x + 1 < width ? input[x + 1] * 3 + neighbour[x + 1] : column;
                destination[2 * x] = (byte)((column * 3 + previous + 8) >> 4);
                if (2 * x + 1 < destination.Length)
                {
                    destination[2 * x + 1] = (byte)((column * 3 + next + 7) >> 4);
                }
            }
        }
        else
        {
            ReadOnlySpan<byte> input = samples.AsSpan(row * stride, width);
            for (int x = 0; x < destination.Length; x++)
            {
                destination[x] = input[x / horizontalRatio];
            }
        }
    }

    /// <summary>libjpeg's ycc_rgb_convert for one row, writing interleaved RGB.</summary>
    public static void YCbCrToRgb(ReadOnlySpan<byte> luma, ReadOnlySpan<byte> blueDifference, ReadOnlySpan<byte> redDifference, Span<byte> rgb)
    {
        for (int x = 0; x < luma.Length; x++)
        {
            int y = luma[x], cb = blueDifference[x], cr = redDifference[x];
            rgb[3 * x] = ClampToByte(y + s_crToRed[cr]);
            rgb[3 * x + 1] = ClampToByte(y + ((s_cbToGreen[cb] + s_crToGreen[cr]) >> ScaleBits));
            rgb[3 * x + 2] = ClampToByte(y + s_cbToBlue[cb]);
        }
    }

    private static byte ClampToByte(int value) => (byte)Math.Clamp(value, 0, 255);
}
