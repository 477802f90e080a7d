namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>A box in image pixels, corners (X1, Y1) inclusive and (X2, Y2) exclusive.</summary>
public readonly record struct PixelBox(int X1, int Y1, int X2, int Y2)
{
    public int Width => X2 - X1;
    public int Height => Y2 - Y1;
}

/// <summary>
/// Places a decoded 64x64 mask into an image the way big_vision's PaliGemma segmentation evaluator does: loc tokens
/// give a pixel box, the mask is resized to the box with Pillow's BILINEAR filter on a float image, thresholded at 0
/// and pasted at the box's corner.
/// </summary>
public static class MaskPlacement
{
    private const int LocBins = 1024;
    private const int MaskSize = 64;

    /// <summary>
    /// The evaluator's pixel box for loc tokens (y1, x1, y2, x2), each 0..1023: <c>int((t / 1023.0) * size)</c> per
    /// coordinate. Dividing first and truncating matters: (87 / 1023.0) * 341 is 28.999999999999996, so the box starts at 28.
    /// </summary>
    /// <returns>The box, or null when it is empty (y2 &lt;= y1 or x2 &lt;= x1) in tokens or after truncation to pixels.</returns>
    public static PixelBox? PixelBoxOf(ReadOnlySpan<int> locY1X1Y2X2, int imageWidth, int imageHeight)
    {
        if (locY1X1Y2X2.Length != 4)
            throw new ArgumentException($"a box needs 4 loc values (y1, x1, y2, x2); got {locY1X1Y2X2.Length}", nameof(locY1X1Y2X2));
        for (int i = 0; i < 4; i++)
        {
            if ((uint)locY1X1Y2X2[i] >= LocBins)
                throw new ArgumentException($"loc value {i} is {locY1X1Y2X2[i]}; loc tokens are 0..{LocBins - 1}", nameof(locY1X1Y2X2));
        }
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageWidth);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageHeight);

        int ty1 = locY1X1Y2X2[0], tx1 = locY1X1Y2X2[1], ty2 = locY1X1Y2X2[2], tx2 = locY1X1Y2X2[3];
        if (ty2 <= ty1 || tx2 <= tx1)
            return null;

        var box = new PixelBox(ToPixel(tx1, imageWidth), ToPixel(ty1, imageHeight), ToPixel(tx2, imageWidth), ToPixel(ty2, imageHeight));
        return box.Width > 0 && box.Height > 0 ? box : null;
    }

    private static int ToPixel(int token, int size) => (int)(token / (double)(LocBins - 1) * size);

    /// <summary>
    /// Pillow's <c>Image.resize((width, height), BILINEAR)</c> of a mode 'F' image, reproduced exactly: separable,
    /// horizontal pass first with its result rounded to float32, then vertical. Output i is centred on (i + 0.5) * in / out;
    /// when shrinking, the triangle filter is widened by in / out; taps are normalised to sum 1 and summed in double.
    /// An unchanged size is a plain copy, and an axis whose size does not change is not filtered.
    /// </summary>
    /// <param name="source">sourceHeight rows of sourceWidth floats.</param>
    /// <returns>height rows of width floats.</returns>
    public static float[] ResizeBilinear(ReadOnlySpan<float> source, int sourceWidth, int sourceHeight, int width, int height)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(sourceWidth);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(sourceHeight);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        if (source.Length != (long)sourceWidth * sourceHeight)
            throw new ArgumentException($"source holds {source.Length} floats; a {sourceWidth}x{sourceHeight} image has {(long)sourceWidth * sourceHeight}", nameof(source));

        if (width == sourceWidth && height == sourceHeight)
            return source.ToArray();

        float[] horizontal;
        if (width != sourceWidth)
        {
            horizontal = new float[sourceHeight * width];
            var taps = FilterTaps.Bilinear(sourceWidth, width);
            for (int y = 0; y < sourceHeight; y++)
            {
                ReadOnlySpan<float> row = source.Slice(y * sourceWidth, sourceWidth);
                Span<float> destination = horizontal.AsSpan(y * width, width);
                for (int x = 0; x < width; x++)
                {
                    ReadOnlySpan<double> weights = taps.Weights(x);
                    int start = taps.Start(x);
                    double sum = 0;
                    for (int j = 0; j < weights.Length; j++)
                        sum += row[start + j] * weights[j];
                    destination[x] = (float)sum;
                }
            }
        }
        else
        {
            horizontal = source.ToArray();
        }

        if (height == sourceHeight)
            return horizontal;

        var result = new float[height * width];
        var verticalTaps = FilterTaps.Bilinear(sourceHeight, height);
        for (int y = 0; y < height; y++)
        {
            ReadOnlySpan<double> weights = verticalTaps.Weights(y);
            int start = verticalTaps.Start(y);
            Span<float> destination = result.AsSpan(y * width, width);
            for (int x = 0; x < width; x++)
            {
                double sum = 0;
                for (int j = 0; j < weights.Length; j++)
                    sum += horizontal[(start + j) * width + x] * weights[j];
                destination[x] = (float)sum;
            }
        }
        return result;
    }

    /// <summary>The 64x64 decoder output resized to the box (values, not yet thresholded): box.Height rows of box.Width floats.</summary>
    public static float[] BoxFloat(ReadOnlySpan<float> mask64, PixelBox box)
    {
        CheckMask(mask64);
        if (box.Width <= 0 || box.Height <= 0)
            throw new ArgumentException($"box {box} is empty; a mask needs a positive width and height", nameof(box));
        return ResizeBilinear(mask64, MaskSize, MaskSize, box.Width, box.Height);
    }

    /// <summary>
    /// The full-image mask, imageHeight rows of imageWidth bytes: 1 where the box-resized mask is &gt; 0, pasted at
    /// (X1, Y1); parts of the box outside the image are dropped. All zero when <paramref name="box"/> is null.
    /// </summary>
    public static byte[] FullMask(ReadOnlySpan<float> mask64, PixelBox? box, int imageWidth, int imageHeight)
    {
        CheckMask(mask64);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageWidth);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(imageHeight);

        var full = new byte[imageWidth * imageHeight];
        if (box is not { } b)
            return full;

        float[] boxMask = BoxFloat(mask64, b);
        int x0 = Math.Max(b.X1, 0), x1 = Math.Min(b.X2, imageWidth);
        int y0 = Math.Max(b.Y1, 0), y1 = Math.Min(b.Y2, imageHeight);
        for (int y = y0; y < y1; y++)
        {
            ReadOnlySpan<float> source = boxMask.AsSpan((y - b.Y1) * b.Width, b.Width);
            Span<byte> destination = full.AsSpan(y * imageWidth, imageWidth);
            for (int x = x0; x < x1; x++)
                destination[x] = source[x - b.X1] > 0f ? (byte)1 : (byte)0;
        }
        return full;
    }

    private static void CheckMask(ReadOnlySpan<float> mask64)
    {
        if (mask64.Length != MaskSize * MaskSize)
            throw new ArgumentException($"mask64 holds {mask64.Length} floats; the decoder output is {MaskSize}x{MaskSize} = {MaskSize * MaskSize}", nameof(mask64));
    }

    /// <summary>Pillow's precompute_coeffs for the triangle (bilinear) filter over a whole axis.</summary>
    private sealed class FilterTaps
    {
        private readonly int[] _starts;
        private readonly int[] _counts;
        private readonly double[] _weights; // outSize rows of _stride, the first _counts[i] used
        private readonly int _stride;

        private FilterTaps(int[] starts, int[] counts, double[] weights, int stride)
        {
            _starts = starts;
            _counts = counts;
            _weights = weights;
            _stride = stride;
        }

        public int Start(int output) => _starts[output];

        public ReadOnlySpan<double> Weights(int output) => _weights.AsSpan(output * _stride, _counts[output]);

        public static FilterTaps Bilinear(int inSize, int outSize)
        {
            const double filterSupport = 1.0;
            double scale = (double)inSize / outSize;
            double filterScale = Math.Max(scale, 1.0);
            double support = filterSupport * filterScale;
            int stride = (int)Math.Ceiling(support) * 2 + 1;
            double inverseFilterScale = 1.0 / filterScale;

            var starts = new int[outSize];
            var counts = new int[outSize];
            var weights = new double[outSize * stride];
            for (int i = 0; i < outSize; i++)
            {
                double center = (i + 0.5) * scale;
                // Pillow rounds the bounds with a C cast of x + 0.5 (truncation toward zero), then clamps.
                int start = Math.Max((int)(center - support + 0.5), 0);
                int end = Math.Min((int)(center + support + 0.5), inSize);
                int count = end - start;
                Span<double> row = weights.AsSpan(i * stride, count);
                double total = 0;
                for (int j = 0; j < count; j++)
                {
                    double w = Triangle((j + start - center + 0.5) * inverseFilterScale);
                    row[j] = w;
                    total += w;
                }
                if (total != 0)
                {
                    for (int j = 0; j < count; j++)
                        row[j] /= total;
                }
                starts[i] = start;
                counts[i] = count;
            }
            return new FilterTaps(starts, counts, weights, stride);
        }

        private static double Triangle(double x)
        {
            x = Math.Abs(x);
            return x < 1.0 ? 1.0 - x : 0.0;
        }
    }
}
